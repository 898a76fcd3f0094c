//! `cargo xtask vm-test --kernel <5.10|6.1|6.12|host|all>`: the integration
//! suite inside QEMU (TCG) on other kernels.
//!
//! Each guest boots a Debian cloud kernel with an initramfs built here: static
//! busybox, the agent, ztai-probe, every `ztai-tests` test executable, `ip`
//! (iproute2) and python3 with prometheus_client (for the metrics tests), all
//! with the shared libraries `ldd` names. suite.sh mounts proc, sysfs,
//! devtmpfs, cgroup2, bpffs and tmpfs, loads veth and bridge, checks that the
//! agent starts (a kernel it does not support gets its refusal recorded and no
//! suite run), runs each test binary, prints `ZTAI-VM-RESULT kernel=..` and
//! powers off. Downloads are cached under `target/vm-cache/`; each run's
//! initramfs and console log go to `target/vm-test/<kernel>/`, the summary to
//! `target/vm-test/summary.txt`.
//!
//! Kernels: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), each Debian
//! release's linux-image-cloud-amd64, fetched with a private apt state; any
//! other series `X.Y` is the newest linux-image-X.Y.*-cloud-amd64 of
//! trixie-backports (e.g. 6.16, 6.18). `host` boots the running kernel when
//! /boot has its image, else runs the suite natively and says why.
//!
//! Test binaries that read the source tree and run host tools (the deploy
//! checks) are left out of the guest, listed with the reason; so would be the
//! metrics tests if the host had no python3 with prometheus_client.
//!
//! Host tools (installed with apt-get when root and missing): qemu-system-x86,
//! busybox-static, iproute2, xz-utils, debian-archive-keyring; also ldd,
//! strip (binutils) and python3 with prometheus_client.
//!
//! Tunables (environment): `ZTAI_VM_TEST_THREADS` (libtest threads per test
//! binary, default 1: TCG is slow and the tests' deadlines are real time),
//! `ZTAI_VM_MEMORY_MB` (default 2048), `ZTAI_VM_CPUS` (default: host CPUs,
//! at most 4), `ZTAI_VM_BIN_TIMEOUT` (seconds per test binary, default 3600),
//! `ZTAI_VM_TIMEOUT` (seconds per guest, default 14400), `ZTAI_VM_QUIET=1`
//! (echo only the ZTAI-VM lines of the console), `ZTAI_VM_ONLY=pods,remote`
//! (only these test binaries), `ZTAI_VM_EXPECT=5.10=refused,6.1=passed` (the
//! result each kernel must have; CI sets it).

mod initramfs;
mod kernels;
mod report;

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{host::is_root, workspace_root};

use self::{
    initramfs::Tree,
    kernels::{Choice, Kernel},
    report::{Report, Verdict},
};

const SUITE_SH: &str = include_str!("suite.sh");

/// Modules the tests need that Debian builds as modules (veth pairs, the pod bridge).
const MODULES: &[&str] = &["veth", "bridge"];

/// A minimal valid policy for the agent start check.
const PREFLIGHT_POLICY: &str = "apiVersion: ztai.dev/v1alpha1\n\
kind: SegmentPolicy\n\
metadata: {name: vm-preflight}\n\
spec:\n  mode: enforce\n  segments:\n    probe: {cgroups: [\"ztai-vm-preflight/probe*\"]}\n  allow: []\n";

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd`, returning its trimmed stdout; fails with its stderr.
pub(crate) fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs `cmd` with output captured; on failure shows it.
pub(crate) fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}):\n{}{}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// One test executable of `ztai-tests`.
#[derive(Debug, Clone)]
struct TestBin {
    /// `harness`, `lib-ztai_tests`, `bin-ztai-probe`, ...
    name: String,
    path: PathBuf,
    src: PathBuf,
}

struct Built {
    agent: PathBuf,
    probe: PathBuf,
    tests: Vec<TestBin>,
}

/// Builds the agent (debug, as `cargo xtask test` does) and the test executables.
fn build() -> anyhow::Result<Built> {
    let mut b = cargo();
    b.args(["build", "--package", "ztai-agent"]);
    eprintln!("xtask vm-test: {}", display(&b));
    if !b.status()?.success() {
        bail!("cargo build -p ztai-agent failed");
    }
    let agent = workspace_root().join("target/debug/ztai-agent");
    let mut t = cargo();
    t.args([
        "test",
        "--package",
        "ztai-tests",
        "--no-run",
        "--message-format=json",
    ])
    .stdout(Stdio::piped());
    eprintln!("xtask vm-test: {}", display(&t));
    let mut child = t.spawn()?;
    let mut text = String::new();
    child
        .stdout
        .take()
        .context("piped stdout")?
        .read_to_string(&mut text)?;
    if !child.wait()?.success() {
        bail!("cargo test -p ztai-tests --no-run failed");
    }
    let mut tests = Vec::new();
    let mut probe = None;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v.get("reason").and_then(Value::as_str) != Some("compiler-artifact") {
            continue;
        }
        let Some(exe) = v.get("executable").and_then(Value::as_str) else {
            continue;
        };
        let name = v
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let kind = v
            .pointer("/target/kind")
            .map(|k| k.get(0).and_then(Value::as_str).unwrap_or("?").to_string())
            .unwrap_or_default();
        let is_test = v
            .pointer("/profile/test")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let src = PathBuf::from(
            v.pointer("/target/src_path")
                .and_then(Value::as_str)
                .unwrap_or(""),
        );
        if !is_test {
            if kind == "bin" && name == "ztai-probe" {
                probe = Some(PathBuf::from(exe));
            }
            continue;
        }
        let name = match kind.as_str() {
            "test" => name,
            other => format!("{other}-{name}"),
        };
        if !tests.iter().any(|t: &TestBin| t.name == name) {
            tests.push(TestBin {
                name,
                path: PathBuf::from(exe),
                src,
            });
        }
    }
    // The harness first (quick sanity of cgroups/netns), then the rest by name.
    tests.sort_by_key(|t| {
        (
            t.name != "harness",
            t.name.starts_with("lib-") || t.name.starts_with("bin-"),
            t.name.clone(),
        )
    });
    let probe = probe.context("cargo did not report the ztai-probe binary")?;
    if tests.is_empty() {
        bail!("cargo reported no ztai-tests test executables");
    }
    Ok(Built {
        agent,
        probe,
        tests,
    })
}

/// Test binaries that run python3 with prometheus_client.
fn needs_python(t: &TestBin) -> bool {
    fs::read_to_string(&t.src).is_ok_and(|s| s.contains("parse_with_prometheus_client"))
}

/// Why a test binary cannot run in the guest at all: it checks files of the
/// source tree (deploy/, xtask/) with host tools (podman, systemd,
/// kubernetes-validate), none of which the guest has.
fn host_only(t: &TestBin) -> Option<String> {
    let src = fs::read_to_string(&t.src).ok()?;
    let reads_tree = [
        "workspace_root(",
        "CARGO_MANIFEST_DIR",
        "#[path = \"../../xtask/",
    ]
    .iter()
    .any(|p| src.contains(p));
    reads_tree.then(|| {
        format!(
            "{}: reads the source tree and runs host tools (e.g. podman, systemd, kubernetes-validate) \
             that the guest does not have; `cargo xtask test` runs it on the host",
            t.name
        )
    })
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Everything every guest shares.
fn common_tree(built: &Built, scratch: &Path) -> anyhow::Result<(Tree, Vec<String>)> {
    let mut t = Tree::new(scratch)?;
    let busybox = which("busybox").or_else(|| {
        ["/bin/busybox", "/usr/bin/busybox"]
            .map(PathBuf::from)
            .into_iter()
            .find(|p| p.is_file())
    });
    let busybox = busybox.context("busybox is missing (Debian: apt-get install busybox-static)")?;
    t.program("/bin/busybox", &busybox, false)?;
    for applet in [
        "sh", "init", "mount", "insmod", "poweroff", "timeout", "tee", "grep", "sed", "awk", "cat",
        "cut", "sleep", "mkdir",
    ] {
        t.symlink(&format!("/bin/{applet}"), "busybox");
    }
    t.bytes(
        "/init",
        "#!/bin/sh\n/bin/busybox --install -s /bin 2>/dev/null\nexec /bin/busybox init\n",
        0o755,
    );
    t.bytes("/etc/inittab", "::sysinit:/ztai/suite.sh\n", 0o644);
    t.bytes("/ztai/suite.sh", SUITE_SH, 0o755);
    t.bytes("/ztai/preflight.yaml", PREFLIGHT_POLICY, 0o644);
    t.bytes(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    );
    t.bytes("/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644);
    t.bytes(
        "/etc/hosts",
        "127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
        0o644,
    );
    t.bytes(
        "/etc/nsswitch.conf",
        "passwd: files\ngroup: files\nhosts: files\n",
        0o644,
    );
    t.char_dev("/dev/console", 5, 1);
    t.char_dev("/dev/null", 1, 3);
    for d in [
        "/proc",
        "/sys",
        "/tmp",
        "/run",
        "/root",
        "/var/run",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
    ] {
        t.dir(d);
    }
    // iproute2's ip (netns, veth, bridge: more than busybox's ip offers).
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .map(PathBuf::from)
        .into_iter()
        .find(|p| p.is_file())
        .context("iproute2's ip is missing (Debian: apt-get install iproute2)")?;
    t.program("/usr/sbin/ip", &ip, false)?;
    // util-linux's setpriv (ahead of busybox's on PATH): the capabilities tests
    // drop capabilities with --bounding-set, which busybox's setpriv lacks.
    let setpriv = which("setpriv").context("util-linux's setpriv is missing (Debian: apt-get install util-linux)")?;
    t.program("/usr/bin/setpriv", &setpriv, false)?;
    // bpftool only appears in failure messages; take it when there is one.
    if let Some(bpftool) = which("bpftool")
        .or_else(|| Some(PathBuf::from("/usr/sbin/bpftool")).filter(|p| p.is_file()))
    {
        t.program("/usr/sbin/bpftool", &bpftool, true)?;
    }
    t.program("/ztai/bin/ztai-agent", &built.agent, true)?;
    t.program("/ztai/bin/ztai-probe", &built.probe, true)?;
    // Python for the metrics tests, or those binaries left out with the reason.
    let mut excluded: Vec<String> = built.tests.iter().filter_map(host_only).collect();
    let python_users: Vec<&TestBin> = built
        .tests
        .iter()
        .filter(|t| needs_python(t) && host_only(t).is_none())
        .collect();
    if !python_users.is_empty() {
        match initramfs::find_python() {
            Ok(py) => {
                let n = initramfs::add_python(&mut t, &py)?;
                eprintln!(
                    "xtask vm-test: python for {}: {} ({} stdlib files) with prometheus_client from {}",
                    python_users
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    py.executable.display(),
                    n,
                    py.prometheus_client.display()
                );
            }
            Err(why) => {
                for u in &python_users {
                    excluded.push(format!("{}: needs python3 with prometheus_client, which is not in the guest: {why}", u.name));
                }
            }
        }
    }
    for tb in &built.tests {
        if excluded
            .iter()
            .any(|e| e.starts_with(&format!("{}:", tb.name)))
        {
            continue;
        }
        t.program(&format!("/ztai/bin/deps/{}", tb.name), &tb.path, true)?;
    }
    Ok((t, excluded))
}

fn is_program(name: &str) -> bool {
    which(name).is_some()
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(name).is_file())
}

/// Host tools the guests are built and run with, installed with apt-get when
/// missing (as root on Debian), else a clear error naming the packages.
fn ensure_tools() -> anyhow::Result<()> {
    let needs: [(bool, &str); 6] = [
        (is_program("qemu-system-x86_64"), "qemu-system-x86"),
        (
            is_program("busybox") || Path::new("/bin/busybox").is_file(),
            "busybox-static",
        ),
        (is_program("ip"), "iproute2"),
        (is_program("xz"), "xz-utils"),
        (is_program("dpkg-deb") && is_program("apt-get"), "apt"),
        (
            Path::new("/usr/share/keyrings/debian-archive-keyring.gpg").is_file(),
            "debian-archive-keyring",
        ),
    ];
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(ok, _)| !ok)
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !is_program("apt-get") {
        bail!(
            "missing host tools for vm-test; install them (Debian: apt-get install --no-install-recommends {})",
            missing.join(" ")
        );
    }
    let install = || {
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("xtask vm-test: {}", display(&c));
        run_quiet(&mut c)
    };
    install()
        .or_else(|_| {
            run_quiet(Command::new("apt-get").args(["update", "-q"]))?;
            install()
        })
        .with_context(|| format!("cannot install {}", missing.join(" ")))
}

/// How one kernel went.
struct Outcome {
    label: String,
    release: String,
    origin: String,
    how: &'static str,
    report: Report,
    /// Host wall clock: QEMU start to exit (or the native run).
    wall: Duration,
    /// Host wall clock until the init printed ZTAI-VM-INIT.
    boot: Option<Duration>,
    prepare: Duration,
    log: PathBuf,
    qemu_error: Option<String>,
}

pub fn vm_test(kernels: &[String]) -> anyhow::Result<()> {
    let mut choices = Vec::new();
    for k in kernels {
        for part in k.split(',') {
            for c in Choice::parse(part)? {
                if !choices.contains(&c) {
                    choices.push(c);
                }
            }
        }
    }
    if choices.is_empty() {
        bail!("name at least one kernel: --kernel 5.10|6.1|6.12|host|all (repeatable)");
    }
    let root = workspace_root();
    let cache = root.join("target/vm-cache");
    let out_dir = root.join("target/vm-test");
    fs::create_dir_all(&cache)?;
    fs::create_dir_all(&out_dir)?;

    let needs_vm = choices.iter().any(|c| !c.is_host()) || kernels::host_kernel().is_ok();
    if needs_vm {
        ensure_tools()?;
    }
    let built = build()?;
    let mut common = None;
    let mut outcomes = Vec::new();
    for choice in choices {
        let label = choice.label().to_string();
        let prep_start = Instant::now();
        let kernel = match choice.is_host() {
            true => match kernels::host_kernel() {
                Ok(k) => k,
                Err(why) => {
                    eprintln!(
                        "xtask vm-test: host: {why}, so it cannot be booted in a VM; running the suite natively on the \
                         host kernel instead (what `cargo xtask test` does)"
                    );
                    outcomes.push(run_native(&built, &out_dir, prep_start)?);
                    continue;
                }
            },
            false => kernels::debian_kernel(&cache, &choice)?,
        };
        if common.is_none() {
            common = Some(common_tree(&built, &out_dir.join("stripped"))?);
        }
        let (tree, excluded) = common.as_ref().unwrap();
        let dir = out_dir.join(&label);
        fs::create_dir_all(&dir)?;
        let initrd = dir.join("initramfs.cpio");
        let size = guest_image(tree, excluded, &built, &kernel, &initrd)?;
        eprintln!(
            "xtask vm-test: {label}: {} ({}), initramfs {} MB",
            kernel.release,
            kernel.origin,
            size / (1 << 20)
        );
        let prepare = prep_start.elapsed();
        outcomes.push(boot(&kernel, &initrd, &dir, prepare)?);
    }
    summarize(&outcomes, &out_dir)
}

/// The guest dies with the task that started it (PR_SET_PDEATHSIG), so a
/// vm-test that is killed or interrupted leaves no QEMU running. vm-test
/// spawns from its main thread only, whose exit is the signal.
fn die_with_this_task(cmd: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    unsafe extern "C" {
        fn prctl(option: std::ffi::c_int, ...) -> std::ffi::c_int;
    }
    const PR_SET_PDEATHSIG: std::ffi::c_int = 1;
    const SIGKILL: std::ffi::c_ulong = 9;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| match prctl(PR_SET_PDEATHSIG, SIGKILL) {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        });
    }
}

fn guest_image(
    common: &Tree,
    excluded: &[String],
    built: &Built,
    kernel: &Kernel,
    out: &Path,
) -> anyhow::Result<u64> {
    let mut t = common.clone();
    let mut order = String::new();
    if let Some(tree) = &kernel.modules {
        let (mods, remarks) = kernels::modules_with_deps(tree, MODULES)?;
        for m in mods {
            t.bytes(&format!("/ztai/modules/{}.ko", m.name), m.bytes, 0o644);
            let _ = writeln!(order, "{}", m.name);
        }
        for r in remarks {
            eprintln!("xtask vm-test: {}: module {r}", kernel.label);
        }
    } else {
        eprintln!(
            "xtask vm-test: {}: no module tree; veth/bridge must be built in",
            kernel.label
        );
    }
    t.bytes("/ztai/modules/order", order, 0o644);
    let only = std::env::var("ZTAI_VM_ONLY").unwrap_or_default();
    let only: Vec<&str> = only
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let tests: Vec<&str> = built
        .tests
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !excluded.iter().any(|e| e.starts_with(&format!("{n}:"))))
        .filter(|n| only.is_empty() || only.contains(n))
        .collect();
    let threads = env_num("ZTAI_VM_TEST_THREADS", 1);
    let config = format!(
        "KERNEL='{}'\nTHREADS='{threads}'\nBIN_TIMEOUT='{}'\nPREFLIGHT_TIMEOUT='{}'\nTESTS='{}'\n",
        kernel.label,
        env_num("ZTAI_VM_BIN_TIMEOUT", 3600),
        env_num("ZTAI_VM_PREFLIGHT_TIMEOUT", 300),
        tests.join(" ")
    );
    t.bytes("/ztai/config", config, 0o644);
    let mut ex = excluded.join("\n");
    ex.push('\n');
    t.bytes("/ztai/excluded", ex, 0o644);
    t.write(out)
}

fn host_cpus() -> u64 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1)
}

/// Boots `kernel` with `initrd` under TCG, echoing and logging the console.
fn boot(kernel: &Kernel, initrd: &Path, dir: &Path, prepare: Duration) -> anyhow::Result<Outcome> {
    let label = kernel.label.clone();
    let log_path = dir.join("console.log");
    let mut log = fs::File::create(&log_path)?;
    let cpus = env_num("ZTAI_VM_CPUS", host_cpus().min(4));
    let mem = env_num("ZTAI_VM_MEMORY_MB", 2048);
    let timeout = Duration::from_secs(env_num("ZTAI_VM_TIMEOUT", 14400));
    let quiet = std::env::var_os("ZTAI_VM_QUIET").is_some_and(|v| v == "1");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-cpu",
        "max",
        "-smp",
        &cpus.to_string(),
        "-m",
        &mem.to_string(),
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(&kernel.image)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0,115200 panic=-1 loglevel=3 random.trust_cpu=on rdinit=/init",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!("xtask vm-test: {label}: {}", display(&cmd));
    let start = Instant::now();
    die_with_this_task(&mut cmd);
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let stdout = child.stdout.take().context("piped stdout")?;
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_string();
                    if tx.send(Some(line)).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(None);
    });
    let mut stderr = child.stderr.take().context("piped stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut console = String::new();
    let mut boot_at = None;
    let mut timed_out = false;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Some(line)) => {
                if boot_at.is_none() && line.starts_with("ZTAI-VM-INIT") {
                    boot_at = Some(start.elapsed());
                }
                let _ = writeln!(log, "{line}");
                let _ = log.flush();
                if !quiet || line.starts_with("ZTAI-VM") {
                    println!("[{label} {:>6.0}s] {line}", start.elapsed().as_secs_f64());
                }
                console.push_str(&line);
                console.push('\n');
            }
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait()?;
    let wall = start.elapsed();
    let _ = reader.join();
    let qemu_stderr = err_reader.join().unwrap_or_default();
    let mut qemu_error = None;
    if timed_out {
        qemu_error = Some(format!(
            "killed after {} (ZTAI_VM_TIMEOUT)",
            fmt_secs(timeout.as_secs_f64())
        ));
    } else if !status.success() || !qemu_stderr.trim().is_empty() {
        let text = format!("qemu exited with {status}: {}", qemu_stderr.trim());
        if !status.success() {
            qemu_error = Some(text);
        } else {
            eprintln!("xtask vm-test: {label}: {text}");
        }
    }
    let report = report::parse(&console);
    Ok(Outcome {
        label,
        release: report
            .release
            .clone()
            .unwrap_or_else(|| kernel.release.clone()),
        origin: kernel.origin.clone(),
        how: "qemu tcg",
        report,
        wall,
        boot: boot_at,
        prepare,
        log: log_path,
        qemu_error,
    })
}


/// The suite on the running kernel, reported like a guest (same markers).
fn run_native(built: &Built, out_dir: &Path, prep_start: Instant) -> anyhow::Result<Outcome> {
    let dir = out_dir.join("host");
    fs::create_dir_all(&dir)?;
    let log_path = dir.join("console.log");
    let release = output(Command::new("uname").arg("-r")).unwrap_or_default();
    if !is_root() {
        eprintln!(
            "xtask vm-test: host: not root, so the integration tests will report themselves SKIPPED"
        );
    }
    let prepare = prep_start.elapsed();
    let start = Instant::now();
    let mut console = format!("ZTAI-VM-INIT kernel=host release={release} uptime=0\n");
    for t in &built.tests {
        console.push_str(&format!("ZTAI-VM-BEGIN {}\n", t.name));
        println!("[host] running {}", t.name);
        let s = Instant::now();
        let out = Command::new(&t.path)
            .env("ZTAI_AGENT_BIN", &built.agent)
            .env("ZTAI_PROBE_BIN", &built.probe)
            .current_dir(workspace_root().join("tests"))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", t.path.display()))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let count = |suffix: &str| {
            text.lines()
                .filter(|l| l.starts_with("test ") && l.ends_with(suffix))
                .count()
        };
        let (p, mut f, i) = (
            count(" ... ok"),
            count(" ... FAILED"),
            text.lines()
                .filter(|l| l.starts_with("test ") && l.contains(" ... ignored"))
                .count(),
        );
        let rc = out.status.code().unwrap_or(-1);
        let note = if rc != 0 && f == 0 {
            f = 1;
            " note=exited-without-a-failed-test"
        } else {
            ""
        };
        // libtest counts a skipped test as passed; the report subtracts the skips.
        let skipped = text.matches("SKIPPED: ").count();
        println!(
            "[host] {}: {} passed, {f} failed, {i} ignored{}",
            t.name,
            p.saturating_sub(skipped),
            if skipped > 0 {
                format!(", {skipped} SKIPPED")
            } else {
                String::new()
            }
        );
        console.push_str(&text);
        console.push_str(&format!(
            "\nZTAI-VM-END {} rc={rc} passed={p} failed={f} ignored={i} skipped={skipped} seconds={:.1}{note}\n",
            t.name,
            s.elapsed().as_secs_f64()
        ));
    }
    let r0 = report::parse(&console);
    console.push_str(&format!(
        "ZTAI-VM-RESULT kernel=host passed={} failed={} ignored={} excluded=0 binaries={} seconds={:.1}\n",
        r0.passed(),
        r0.failed(),
        r0.ignored(),
        built.tests.len(),
        start.elapsed().as_secs_f64()
    ));
    fs::write(&log_path, &console)?;
    let report = report::parse(&console);
    println!("{}", report.result_line.clone().unwrap_or_default());
    Ok(Outcome {
        label: "host".into(),
        release,
        origin: "running kernel (native, no VM)".into(),
        how: "native",
        report,
        wall: start.elapsed(),
        boot: None,
        prepare,
        log: log_path,
        qemu_error: None,
    })
}

/// `ZTAI_VM_EXPECT=5.10=refused,6.1=passed`: the result each kernel must have, so a kernel that
/// starts being refused (a raised floor) fails the run instead of passing as "refused".
fn expectations() -> anyhow::Result<Vec<(String, String)>> {
    let raw = std::env::var("ZTAI_VM_EXPECT").unwrap_or_default();
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, w @ ("passed" | "refused"))) => Ok((k.trim().to_string(), w.to_string())),
            _ => bail!("ZTAI_VM_EXPECT: {p:?} is not <kernel>=passed|refused"),
        })
        .collect()
}

fn summarize(outcomes: &[Outcome], out_dir: &Path) -> anyhow::Result<()> {
    let mut s = String::new();
    let _ = writeln!(s, "\nztai vm-test summary (TCG, {} host CPUs)", host_cpus());
    let _ = writeln!(
        s,
        "{:<6} {:<28} {:<9} {:>6} {:>6} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9}",
        "kernel",
        "release",
        "result",
        "passed",
        "failed",
        "skipped",
        "ignored",
        "excluded",
        "boot",
        "suite",
        "total"
    );
    let expected = expectations()?;
    let mut bad = Vec::new();
    let mut unexpected = Vec::new();
    for o in outcomes {
        let r = &o.report;
        let verdict = if o.qemu_error.is_some() && r.result_line.is_none() {
            Verdict::Broken
        } else {
            r.verdict()
        };
        let word = match verdict {
            Verdict::Passed => "passed",
            Verdict::Failed => "FAILED",
            Verdict::Refused => "refused",
            Verdict::Broken => "BROKEN",
        };
        if matches!(verdict, Verdict::Failed | Verdict::Broken) {
            bad.push(o.label.clone());
        } else if let Some((_, want)) = expected.iter().find(|(k, _)| *k == o.label)
            && want != word
        {
            bad.push(o.label.clone());
            unexpected.push(format!("{}: {word}, expected {want}", o.label));
        }
        let boot = o
            .boot
            .map(|b| fmt_secs(b.as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let suite = r.suite_seconds.map(fmt_secs).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<6} {:<28} {:<9} {:>6} {:>6} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9}",
            o.label,
            o.release,
            word,
            r.passed(),
            r.failed(),
            r.skipped(),
            r.ignored(),
            r.excluded.len(),
            boot,
            suite,
            fmt_secs((o.wall + o.prepare).as_secs_f64())
        );
    }
    let _ = writeln!(
        s,
        "(boot: QEMU start until the guest's init ran; suite: inside the guest; total: preparing the kernel and initramfs + the whole VM run)"
    );
    for o in outcomes {
        let r = &o.report;
        let _ = writeln!(
            s,
            "\n{} — {} via {}; console log: {}",
            o.label,
            o.origin,
            o.how,
            o.log.display()
        );
        if let Some(line) = &r.result_line {
            let _ = writeln!(s, "  {line}");
        }
        if let Some(e) = &o.qemu_error {
            let _ = writeln!(s, "  [{}] {e}", o.label);
        }
        if r.result_line.is_none() {
            let _ = writeln!(
                s,
                "  [{}] no ZTAI-VM-RESULT line: the guest did not finish{}",
                o.label,
                r.unfinished
                    .as_ref()
                    .map(|b| format!(" (last test binary: {b})"))
                    .unwrap_or_default()
            );
        }
        for e in &r.excluded {
            let _ = writeln!(s, "  [{}] excluded {e}", o.label);
        }
        s.push_str(&r.details(&o.label, 30));
        if !r.dmesg.is_empty() {
            let interesting: Vec<&String> = r
                .dmesg
                .iter()
                .filter(|l| {
                    l.contains("bpf")
                        || l.contains("BUG")
                        || l.contains("WARNING")
                        || l.contains("Call Trace")
                })
                .collect();
            for l in interesting.iter().take(20) {
                let _ = writeln!(s, "  [{}] dmesg: {l}", o.label);
            }
        }
    }
    for u in &unexpected {
        let _ = writeln!(s, "  unexpected result: {u} (ZTAI_VM_EXPECT)");
    }
    print!("{s}");
    let _ = fs::write(out_dir.join("summary.txt"), &s);
    if bad.is_empty() {
        Ok(())
    } else {
        bail!(
            "the suite failed on: {} (details above; console logs under {})",
            bad.join(", "),
            out_dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    #[test]
    fn cargo_artifact_line() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"harness","src_path":"/w/tests/tests/harness.rs","test":true},"profile":{"test":true,"opt_level":"0"},"executable":"/w/target/debug/deps/harness-c1","fresh":true,"x":[1,2.5,-3e2,null,false]}"#;
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            v.pointer("/target/name").and_then(Value::as_str),
            Some("harness")
        );
        assert_eq!(
            v.pointer("/profile/test").and_then(Value::as_bool),
            Some(true)
        );
        assert_eq!(
            v.get("executable").and_then(Value::as_str),
            Some("/w/target/debug/deps/harness-c1")
        );
        assert_eq!(
            v.pointer("/target/kind")
                .and_then(|k| k.get(0))
                .and_then(Value::as_str),
            Some("test")
        );
        assert_eq!(v.get("x").and_then(Value::as_array).unwrap().len(), 5);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            serde_json::from_str::<Value>(r#""a\"b\\c\u00e9\ud83d\ude00\n""#).unwrap(),
            Value::String("a\"b\\cé😀\n".into())
        );
    }
}
