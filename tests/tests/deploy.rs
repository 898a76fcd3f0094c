//! Deployment artifacts (`deploy/`): the Kubernetes manifests, the systemd unit and the container
//! image.
//!
//! * The manifests validate offline against the Kubernetes schemas (`kubernetes-validate`, PyPI,
//!   schemas shipped in the package) and keep what the design needs: privileges, probes, update
//!   strategy, the reference policy verbatim.
//! * The unit passes `systemd-analyze verify` (and its exposure score stays low); as root, the
//!   agent runs under the unit's complete sandbox, in a systemd booted as PID 1 of private
//!   namespaces inside a test cgroup subtree, and does everything it needs to: enforce, read
//!   other users' sockets (procfs, pidfd_getfd), enter workloads' network namespaces, reload,
//!   restart adopting its pins, keep enforcing while stopped.
//! * As root, the image builds with podman around a static agent (the build `cargo xtask image`
//!   runs) and is inspected without running a container.
//!
//! Needs python3 with kubernetes-validate (`python3 -m pip install kubernetes-validate`), and as
//! root podman and systemd's tools (`cargo xtask setup` installs them). Without systemd-analyze
//! the unit check prints SKIPPED saying so.
//!
//! Fixed policy ports of this file: 27597.

#[path = "../../xtask/src/deploy.rs"]
#[allow(dead_code)]
mod deploy;

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use ztai_tests::{
    DEFAULT_TIMEOUT, READY_TIMEOUT, TempDir, require_root, try_wait_until, wait_until,
};

/// The capabilities the agent runs with, everywhere (DaemonSet `add`, unit bounding set).
const CAPABILITIES: [&str; 6] = [
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
];
/// Their bits (capability.h): DAC_READ_SEARCH 2, NET_ADMIN 12, SYS_PTRACE 19, SYS_ADMIN 21,
/// PERFMON 38, BPF 39.
const CAPABILITY_MASK: u64 = 1 << 2 | 1 << 12 | 1 << 19 | 1 << 21 | 1 << 38 | 1 << 39;
/// Oldest Kubernetes the manifests are checked against (securityContext.appArmorProfile is 1.30).
const MIN_KUBERNETES: &str = "1.30.0";
const IMAGE_MAX_BYTES: u64 = 40 << 20;
const METRICS_PORT: i64 = 9469;
const SANDBOX_PORT: u16 = 27597;

fn root() -> PathBuf {
    deploy::workspace_root()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn manifests() -> Vec<PathBuf> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected the namespace, account, policy and DaemonSet manifests: {files:?}"
    );
    files
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

#[track_caller]
fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The validator's Python modules are there (they bring PyYAML too), or the test fails saying how
/// to install them.
fn require_kubernetes_validate() {
    let out = Command::new("python3")
        .args(["-c", "import kubernetes_validate, yaml"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "kubernetes-validate is missing ({}); install it: python3 -m pip install {} \
             (cargo xtask setup does)",
            String::from_utf8_lossy(&o.stderr).trim(),
            deploy::KUBERNETES_VALIDATE
        ),
        Err(e) => panic!(
            "python3 is missing ({e}); the manifest checks need python3 with kubernetes-validate"
        ),
    }
}

/// Every YAML document of `path` as JSON (parsed by PyYAML, as kubectl-side tools do).
fn yaml_documents(path: &Path) -> Vec<Value> {
    require_kubernetes_validate();
    let json = run_ok(
        Command::new("python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
            ])
            .arg(path),
    );
    match serde_json::from_str(&json) {
        Ok(Value::Array(docs)) => docs,
        other => panic!(
            "{}: not a list of YAML documents: {other:?}",
            path.display()
        ),
    }
}

fn all_documents() -> Vec<(PathBuf, Value)> {
    manifests()
        .into_iter()
        .flat_map(|f| yaml_documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

fn kind<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| d["kind"] == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in deploy/kubernetes"
    );
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected strings, got {s}"))
                .to_string()
        })
        .collect()
}

#[test]
fn kubernetes_manifests_validate_offline_against_the_kubernetes_schemas() {
    require_kubernetes_validate();
    let latest = run_ok(Command::new("python3").args([
        "-c",
        "import kubernetes_validate.utils as u; print(u.latest_version())",
    ]))
    .trim()
    .to_string();
    let files = manifests();
    let documents: usize = files.iter().map(|f| yaml_documents(f).len()).sum();
    let versions = [MIN_KUBERNETES.to_string(), latest];
    // Offline: the schemas ship in the package. As root, prove it with an empty network namespace.
    let mut cmd = if ztai_tests::is_root() {
        let mut c = Command::new("unshare");
        c.args(["--net", "python3"]);
        c
    } else {
        Command::new("python3")
    };
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for v in &versions {
        cmd.args(["--kubernetes-version", v]);
    }
    cmd.args(&files);
    let out = run(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "kubernetes-validate failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // A kind without a schema is only a WARN with exit 0: every document must have passed.
    let passed = stdout
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed "))
        .count();
    assert_eq!(
        passed,
        documents * versions.len(),
        "every document against every version:\n{stdout}"
    );
    assert!(
        !stdout.lines().any(|l| !l.starts_with("INFO ")),
        "warnings or errors:\n{stdout}"
    );
}

#[test]
fn policy_configmap_holds_the_reference_policy_verbatim() {
    let docs = all_documents();
    let cm = kind(&docs, "ConfigMap");
    let reference = read(&root().join("policies/ai-reference.yaml"));
    assert_eq!(
        cm["data"]["policy.yaml"].as_str(),
        Some(reference.as_str()),
        "ConfigMap data.policy.yaml != policies/ai-reference.yaml"
    );
    // And the agent accepts it (strict: no warnings either).
    let agent = ztai_tests::agent::agent_bin();
    let dir = TempDir::new("deploy-policy");
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, cm["data"]["policy.yaml"].as_str().unwrap()).expect("write policy");
    run_ok(Command::new(agent).arg("check").arg("--strict").arg(&file));
}

#[test]
fn daemonset_keeps_narrow_privileges_probes_metrics_and_an_enforcing_rollout() {
    let docs = all_documents();
    let ns = kind(&docs, "Namespace");
    let namespace = ns["metadata"]["name"].as_str().expect("namespace name");
    for (file, d) in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(
                d["metadata"]["namespace"],
                namespace,
                "{}: {} outside {namespace}",
                file.display(),
                d["kind"]
            );
        }
    }
    // The pod needs host namespaces and hostPath: Pod Security must be "privileged" there.
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    let sa = kind(&docs, "ServiceAccount");
    assert_eq!(
        sa["automountServiceAccountToken"], false,
        "the agent never uses the API"
    );

    let ds = kind(&docs, "DaemonSet");
    let spec = &ds["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(
        pod["hostPID"], true,
        "workload pids and /proc/<pid> need the host pid namespace"
    );
    assert_eq!(
        pod["hostNetwork"], true,
        "host addresses, rtnetlink and /proc/net need the host network namespace"
    );
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}]),
        "runs on every node"
    );

    // Rollout: never two agents on a node, one node at a time, ready = policy applied.
    assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(spec["updateStrategy"]["rollingUpdate"]["maxSurge"], 0);
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        (10..=120).contains(&grace),
        "terminationGracePeriodSeconds {grace}"
    );

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "run");
    assert!(
        !args.iter().any(|a| a.contains("detach-on-exit")),
        "--detach-on-exit would end enforcement on every rollout: {args:?}"
    );
    let arg_after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"))
            .clone()
    };
    // The policy: the ConfigMap, mounted where --policy points.
    let policy = arg_after("--policy");
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    let volumes = pod["volumes"].as_array().expect("volumes");
    let mount_at = |path: &str| {
        mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
    };
    let volume = |name: &Value| {
        volumes
            .iter()
            .find(|v| v["name"] == *name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let policy_dir = Path::new(&policy)
        .parent()
        .expect("policy dir")
        .to_str()
        .unwrap()
        .to_string();
    let policy_volume = volume(&mount_at(&policy_dir)["name"]);
    assert_eq!(
        policy_volume["configMap"]["name"],
        kind(&docs, "ConfigMap")["metadata"]["name"]
    );
    // Metrics and probes: bound to the node address (the pod IP with hostNetwork), port 9469.
    let metrics = arg_after("--metrics-addr");
    assert_eq!(metrics, format!("$(HOST_IP):{METRICS_PORT}"));
    let env = c["env"].as_array().expect("env");
    let host_ip = env
        .iter()
        .find(|e| e["name"] == "HOST_IP")
        .expect("HOST_IP env");
    assert_eq!(
        host_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let port = c["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["containerPort"] == METRICS_PORT))
        .expect("metrics port");
    for (probe, path) in [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            get["port"] == port["name"] || get["port"] == METRICS_PORT,
            "{probe} must probe the metrics port: {get}"
        );
    }
    let annotations = &spec["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], METRICS_PORT.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    for r in ["requests", "limits"] {
        for q in ["cpu", "memory"] {
            assert!(
                c["resources"][r][q].is_string(),
                "resources.{r}.{q} missing"
            );
        }
    }

    // Privileges: not privileged, every capability dropped but the six the agent needs.
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    assert_eq!(
        added,
        CAPABILITIES
            .iter()
            .map(|c| c.to_string())
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    // Bidirectional propagation is refused by the API server for unprivileged containers
    // (a schema validator cannot see that).
    for m in mounts {
        assert_ne!(
            m["mountPropagation"], "Bidirectional",
            "Bidirectional needs privileged: true: {m}"
        );
    }
    // Host paths: the host's bpffs (pins outlive the pod), cgroup tree (read-only), socket folder.
    for (path, host, read_only) in [
        ("/sys/fs/bpf", "/sys/fs/bpf", false),
        ("/sys/fs/cgroup", "/sys/fs/cgroup", true),
        ("/run/ztai", "/run/ztai", false),
    ] {
        let m = mount_at(path);
        assert_eq!(
            m["readOnly"].as_bool().unwrap_or(false),
            read_only,
            "{path} readOnly"
        );
        assert_eq!(
            volume(&m["name"])["hostPath"]["path"],
            host,
            "{path} must be the host's {host}"
        );
    }
    // The image's command line matches: entrypoint /ztai-agent, policy at the same path.
    let containerfile = read(&root().join(deploy::CONTAINERFILE));
    assert!(containerfile.contains(r#"ENTRYPOINT ["/ztai-agent"]"#));
    assert!(
        containerfile.contains(&format!(r#"CMD ["run", "--policy", "{policy}"]"#)),
        "Containerfile CMD must use {policy}"
    );
}

/// The unit's own text: the command line and the capability set the sandbox test relies on.
fn unit_text() -> String {
    read(&root().join("deploy/systemd/ztai-agent.service"))
}

fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify_and_keeps_enforcing_across_restarts() {
    let unit = unit_text();
    assert_eq!(
        unit_values(&unit, "ExecStart"),
        ["/usr/local/bin/ztai-agent run --policy /etc/ztai/policy.yaml"]
    );
    assert!(
        !unit
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("detach-on-exit"))
    );
    assert_eq!(unit_values(&unit, "Restart"), ["always"]);
    assert_eq!(unit_values(&unit, "KillSignal"), ["SIGTERM"]);
    let bounding: BTreeSet<String> = unit_values(&unit, "CapabilityBoundingSet")
        .join(" ")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(
        bounding,
        CAPABILITIES
            .iter()
            .map(|c| format!("CAP_{c}"))
            .collect::<BTreeSet<_>>()
    );

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!(
            "SKIPPED: {}: systemd-analyze is not installed, so deploy/systemd/ztai-agent.service was \
             NOT verified (Debian: apt-get install systemd)",
            ztai_tests::current_test_name("systemd_unit")
        );
        return;
    }
    // verify checks that ExecStart's binary exists: point it at an executable that does.
    let dir = TempDir::new("deploy-unit");
    let copy = dir.path().join("ztai-agent.service");
    let exe = std::env::current_exe().expect("current_exe");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/ztai-agent",
            &format!("ExecStart={}", exe.display()),
        ),
    )
    .expect("write unit");
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("systemd-analyze verify: {} {}", out.status, said.trim());
    // Unknown keys and unparsable values are only warnings with exit 0: any output fails.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );

    // Exposure score (0 = locked down, 10 = unprotected); this unit scores about 3.4.
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=40", "--no-pager"])
        .arg(&copy));
    let said = String::from_utf8_lossy(&out.stdout);
    let overall = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("")
        .trim()
        .to_string();
    println!("systemd-analyze security: {overall}");
    if overall.is_empty() {
        println!(
            "NOTE: this systemd-analyze cannot score a unit file offline (needs systemd 250+): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    } else {
        assert!(out.status.success(), "exposure above 4.0: {overall}");
    }
}

// ---------------------------------------------------------------------------------------------
// The unit's sandbox, for real: systemd as PID 1 of private pid/mount/uts/ipc/cgroup namespaces
// (the host's network), inside a test cgroup subtree.

fn systemd_binary() -> Option<PathBuf> {
    ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Entries in a pinned eBPF map (BPF_OBJ_GET, then BPF_MAP_GET_NEXT_KEY until ENOENT).
fn pinned_map_len(path: &Path) -> std::io::Result<usize> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let bpf = |cmd: libc::c_long, attr: &mut [u64; 16]| {
        // SAFETY: `attr` is a zeroed 128-byte bpf_attr the kernel reads and writes in place.
        unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr.as_mut_ptr(),
                std::mem::size_of::<[u64; 16]>() as libc::c_uint,
            )
        }
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in path");
    let mut attr = [0u64; 16];
    attr[0] = c_path.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr);
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; we own it.
    let fd: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd) as u64;
    let mut info = [0u32; 32]; // struct bpf_map_info: type, id, key_size, ...
    let mut attr = [0u64; 16];
    attr[0] = raw | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let key_size = info[2] as usize;
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut count = 0;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = raw;
        attr[1] = if count == 0 { 0 } else { key.as_ptr() as u64 };
        attr[2] = next.as_mut_ptr() as u64;
        if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) != 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(count)
            } else {
                Err(e)
            };
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
    }
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

/// JSON lines of `file` (the agent's stderr or stdout) so far.
fn json_lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// systemd booted in private namespaces; on drop its namespace's init is SIGKILLed (which ends
/// every process in it), the test's pins are removed and the cgroup subtree deleted.
struct Sandbox {
    dir: TempDir,
    subtree: PathBuf,
    launcher: std::process::Child,
    pid1: u32,
    pin_dir: PathBuf,
}

impl Sandbox {
    /// Runs `args` inside the sandbox's namespaces (systemctl, systemd-run, ...).
    fn ns(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid1.to_string(),
            "-m",
            "-p",
            "-u",
            "-i",
            "-C",
            "--",
        ])
        .args(args);
        run(&mut cmd)
    }

    #[track_caller]
    fn ns_ok(&self, args: &[&str]) -> String {
        let out = self.ns(args);
        assert!(
            out.status.success(),
            "{args:?} in the sandbox failed ({}): {}{}\nsystemd log: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("systemd.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A transient unit in `slice` running a copy of ztai-probe from the sandbox's /run.
    fn probe(&self, unit: &str, slice: &str, user: Option<&str>, args: &[&str]) -> PathBuf {
        let out = self.file(&format!("{unit}.out"));
        let mut cmd = vec![
            "systemd-run".to_string(),
            "--quiet".into(),
            format!("--unit={unit}"),
            format!("--slice={slice}"),
            "-p".into(),
            "DefaultDependencies=no".into(),
            "-p".into(),
            format!("StandardOutput=append:{}", out.display()),
            "-p".into(),
            format!("StandardError=append:{}", out.display()),
        ];
        if let Some(u) = user {
            cmd.extend(["-p".into(), format!("User={u}")]);
        }
        cmd.extend(args.iter().map(|a| a.to_string()));
        self.ns_ok(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
        out
    }

    /// The agent service's main process, as a host pid.
    fn agent_pid(&self) -> Option<u32> {
        let procs = std::fs::read_to_string(
            self.subtree
                .join("system.slice/ztai-agent.service/cgroup.procs"),
        )
        .ok()?;
        procs.lines().next()?.trim().parse().ok()
    }

    /// A client in the "client" segment connecting to the "server" listener: no rule allows it.
    #[track_caller]
    fn assert_denied(&self, unit: &str) {
        let out = self.probe(
            unit,
            "ztaicli",
            None,
            &[
                "/run/ztai-sandbox/ztai-probe",
                "tcp-connect",
                &format!("127.0.0.1:{SANDBOX_PORT}"),
                "--timeout-ms",
                "3000",
            ],
        );
        let last = wait_until("the denied client's status line", DEFAULT_TIMEOUT, || {
            let text = std::fs::read_to_string(&out).ok()?;
            text.lines()
                .rev()
                .find(|l| *l == "ok" || l.starts_with("err "))
                .map(str::to_string)
        });
        assert!(
            last.starts_with("err EPERM"),
            "client -> server must fail with EPERM, got {last:?}"
        );
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of the sandbox's init, which this test started.
        unsafe { libc::kill(self.pid1 as libc::pid_t, libc::SIGKILL) };
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        if self.pin_dir.exists() {
            let _ = Command::new(ztai_tests::agent::agent_bin())
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .output();
            let _ = std::fs::remove_dir(&self.pin_dir);
        }
        // The namespace's processes die with its init; then the cgroups empty out.
        let _ = try_wait_until(DEFAULT_TIMEOUT, || {
            let mut dirs: Vec<PathBuf> = walk_dirs(&self.subtree);
            dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
            for d in &dirs {
                let _ = std::fs::remove_dir(d);
            }
            (!self.subtree.exists()).then_some(())
        });
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk_dirs(&e.path()));
            }
        }
    }
    out
}

fn boot_sandbox() -> Sandbox {
    let systemd = systemd_binary().expect(
        "systemd is not installed (Debian: apt-get install systemd; cargo xtask setup does)",
    );
    for tool in ["unshare", "nsenter", "ip"] {
        assert!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is missing (util-linux / iproute2)"
        );
    }
    let mount = ztai_tests::cgroup2_mount();
    let tag = format!("ztai-t{}-sd{}", std::process::id(), ztai_tests::unique_n());
    let subtree = mount.join(&tag);
    std::fs::create_dir(&subtree)
        .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", subtree.display()));
    let dir = TempDir::new("deploy-sandbox");
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(&tag);

    // The policy, relative to the sandbox's cgroup2 mount (its cgroup namespace root).
    let policy = format!(
        "apiVersion: ztai.dev/v1alpha1\nkind: SegmentPolicy\nmetadata:\n  name: sandbox\nspec:\n  segments:\n    \
         server:\n      cgroups: [\"ztaisrv.slice\"]\n    client:\n      cgroups: [\"ztaicli.slice\"]\n  allow:\n    \
         - from: server\n      to: client\n      ports: [\"{SANDBOX_PORT}/tcp\"]\n"
    );
    std::fs::write(dir.path().join("policy.yaml"), policy).expect("write policy");
    // Units: the shipped one verbatim, plus a drop-in with test paths only (the shared pin folder
    // and port stay free) and no default dependencies (sysinit.target would apply the host's
    // sysctl.d files to this kernel).
    let units = dir.path().join("units");
    std::fs::create_dir_all(units.join("ztai-agent.service.d")).expect("units dir");
    std::fs::write(units.join("ztai-agent.service"), unit_text()).expect("unit");
    std::fs::write(
        units.join("ztai-agent.service.d/test.conf"),
        format!(
            "[Unit]\nDefaultDependencies=no\n[Service]\nExecStart=\nExecStart=/run/ztai-sandbox/ztai-agent run \
             --policy /run/ztai-sandbox/policy.yaml --pin-dir {} --metrics-addr 127.0.0.1:0\n\
             StandardOutput=append:{}\nStandardError=append:{}\n",
            pin_dir.display(),
            dir.path().join("agent.out").display(),
            dir.path().join("agent.err").display()
        ),
    )
    .expect("drop-in");
    std::fs::write(
        units.join("ztai-sandbox.target"),
        "[Unit]\nDescription=ztai sandbox test\nDefaultDependencies=no\n",
    )
    .expect("target");
    // Runs in the new namespaces, then becomes systemd. The binaries are copied to /run (a tmpfs
    // of the sandbox) because the unit hides /tmp, /root and /home from the agent.
    let boot = format!(
        "set -e\n\
         umount -R -l /sys/fs/cgroup\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         mount -t tmpfs -o mode=755 tmpfs /run\n\
         mkdir -p /run/systemd/system /run/ztai-sandbox\n\
         cp -r {units}/. /run/systemd/system/\n\
         cp {agent} /run/ztai-sandbox/ztai-agent\n\
         cp {probe} /run/ztai-sandbox/ztai-probe\n\
         cp {dir}/policy.yaml /run/ztai-sandbox/policy.yaml\n\
         chmod 755 /run/ztai-sandbox /run/ztai-sandbox/ztai-agent /run/ztai-sandbox/ztai-probe\n\
         exec env -i container=ztai-test PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
         {systemd} --unit=ztai-sandbox.target --show-status=no >{dir}/systemd.log 2>&1\n",
        units = units.display(),
        agent = ztai_tests::agent::agent_bin().display(),
        probe = ztai_tests::probe_bin().display(),
        dir = dir.path().display(),
        systemd = systemd.display(),
    );
    std::fs::write(dir.path().join("boot.sh"), boot).expect("boot script");
    let launcher = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec unshare --pid --fork --mount --uts --ipc --cgroup \
             --propagation private --mount-proc /bin/sh {}/boot.sh",
            subtree.display(),
            dir.path().display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("start unshare");
    let init_scope = subtree.join("init.scope/cgroup.procs");
    let pid1 = try_wait_until(DEFAULT_TIMEOUT, || {
        std::fs::read_to_string(&init_scope)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse::<u32>()
            .ok()
    });
    let mut sandbox = Sandbox {
        dir,
        subtree,
        launcher,
        pid1: pid1.unwrap_or(0),
        pin_dir,
    };
    if pid1.is_none() {
        let log = std::fs::read_to_string(sandbox.file("systemd.log")).unwrap_or_default();
        let _ = sandbox.launcher.kill();
        panic!("systemd did not start in the sandbox namespaces: {log}");
    }
    let state = wait_until(
        "systemd in the sandbox to finish starting",
        DEFAULT_TIMEOUT,
        || {
            let out = sandbox.ns(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            matches!(s.as_str(), "running" | "degraded").then_some(s)
        },
    );
    println!("sandbox systemd (host pid {}): {state}", sandbox.pid1);
    sandbox
}

#[test]
fn agent_runs_and_enforces_under_the_units_sandbox() {
    require_root!();
    let sb = boot_sandbox();
    let addr = format!("127.0.0.1:{SANDBOX_PORT}");
    // Workloads before the agent: a listener owned by another user (its socket is found through
    // /proc/<pid>/fd and its cookie through pidfd_getfd) and a process in its own network
    // namespace (its address is read after setns into it).
    let listener = sb.probe(
        "ztai-srv",
        "ztaisrv",
        Some("nobody"),
        &["/run/ztai-sandbox/ztai-probe", "tcp-listen", &addr],
    );
    wait_until("the server to listen", DEFAULT_TIMEOUT, || {
        std::fs::read_to_string(&listener)
            .ok()?
            .contains("listening")
            .then_some(())
    });
    sb.probe(
        "ztai-netns",
        "ztaicli",
        None,
        &[
            "unshare",
            "--net",
            "sh",
            "-c",
            "ip link set lo up && ip addr add 198.18.97.2/32 dev lo && exec sleep 600",
        ],
    );

    sb.ns_ok(&["systemctl", "start", "ztai-agent.service"]);
    let err = sb.file("agent.err");
    // Ready, or the error that stopped it (the unit restarts it: the first one is enough).
    let ready = wait_until("the agent's ready line", READY_TIMEOUT, || {
        let lines = json_lines(&err);
        if let Some(failed) = lines.iter().find(|l| l["level"] == "error") {
            return Some(Err(failed.clone()));
        }
        lines.into_iter().find(|l| l["msg"] == "ready").map(Ok)
    })
    .unwrap_or_else(|failed| panic!("the agent failed under the unit's sandbox: {failed}"));
    println!("ready: {ready}");
    let pid = sb.agent_pid().expect("the agent's pid");
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or("")
            .to_string()
    };
    let caps = |name: &str| {
        u64::from_str_radix(&field(name), 16).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(
        caps("CapEff"),
        CAPABILITY_MASK,
        "effective capabilities: exactly the bounding set of the unit"
    );
    assert_eq!(caps("CapBnd"), CAPABILITY_MASK);
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2", "the system call filter is in force");

    // What it could see and do under the sandbox.
    assert!(ready["labeled_cgroups"].as_u64() >= Some(2), "{ready}");
    assert!(
        ready["existing_sockets"].as_u64() >= Some(1),
        "the listener of user nobody was not found in procfs: {ready}"
    );
    let maps = sb.pin_dir.join("maps");
    let len = |name: &str| {
        pinned_map_len(&maps.join(name)).unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
    };
    assert!(
        len("ZTAI_SOCKET_KEYS") >= 1,
        "no socket cookie recorded: pidfd_getfd failed under the sandbox"
    );
    wait_until(
        "the workload namespace's address (setns)",
        DEFAULT_TIMEOUT,
        || (len("ZTAI_WORKLOAD_ADDRS") >= 1).then_some(()),
    );
    let metrics = ready["metrics_addr"]
        .as_str()
        .expect("metrics_addr")
        .to_string();
    assert_eq!(http_status(&metrics, "/readyz"), Some(200));
    let flows = sb.ns_ok(&["/run/ztai-sandbox/ztai-agent", "flows", "--once"]);
    assert!(
        flows.contains("policy sandbox"),
        "flows over /run/ztai/agent.sock: {flows}"
    );

    // Enforcement, with the report on stdout.
    sb.assert_denied("ztai-deny1");
    let out = sb.file("agent.out");
    let report = wait_until("the violation report", DEFAULT_TIMEOUT, || {
        json_lines(&out)
            .into_iter()
            .find(|l| l["src"]["segment"] == "client" && l["dst"]["segment"] == "server")
    });
    assert_eq!(report["verdict"], "deny", "{report}");

    // systemctl reload = SIGHUP: the policy is applied again.
    sb.ns_ok(&["systemctl", "reload", "ztai-agent.service"]);
    wait_until("the reload", DEFAULT_TIMEOUT, || {
        json_lines(&err)
            .into_iter()
            .find(|l| l["msg"] == "policy applied" && l["trigger"] == "SIGHUP")
    });
    // A restart adopts the pinned state.
    sb.ns_ok(&["systemctl", "restart", "ztai-agent.service"]);
    wait_until(
        "the restarted agent to adopt the pins",
        READY_TIMEOUT,
        || {
            json_lines(&err)
                .into_iter()
                .find(|l| l["msg"] == "adopted pinned state of a previous agent")
        },
    );
    // Stopped (SIGTERM): enforcement stays.
    sb.ns_ok(&["systemctl", "stop", "ztai-agent.service"]);
    let links = std::fs::read_dir(sb.pin_dir.join("links"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert!(links >= 1, "links must stay pinned after systemctl stop");
    sb.assert_denied("ztai-deny2");
}

// ---------------------------------------------------------------------------------------------
// The image.

/// Removes the test's image (and its staged context) on drop.
struct Image {
    tag: String,
    context: Option<PathBuf>,
    mounted: bool,
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("podman")
                .args(["image", "unmount", &self.tag])
                .output();
        }
        let _ = Command::new("podman")
            .args(["image", "rm", "--force", &self.tag])
            .output();
        if let Some(c) = &self.context {
            let _ = std::fs::remove_dir_all(c);
        }
    }
}

fn files_under(dir: &Path) -> BTreeSet<String> {
    walk_dirs(dir)
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| !e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            e.path()
                .strip_prefix(dir)
                .expect("under dir")
                .display()
                .to_string()
        })
        .collect()
}

#[test]
fn image_builds_from_scratch_around_the_static_agent() {
    require_root!();
    assert!(
        Command::new("podman").arg("--version").output().is_ok(),
        "podman is missing (Debian: apt-get install podman; cargo xtask setup does)"
    );
    let root = root();
    let mut image = Image {
        tag: format!("localhost/ztai-agent:test-{}", std::process::id()),
        context: None,
        mounted: false,
    };
    let built = deploy::build_image_tagged(&root, &image.tag).unwrap_or_else(|e| panic!("{e}"));
    image.context = Some(built.context.clone());
    let binary = std::fs::read(&built.binary).expect("static agent");
    deploy::elf_is_static(&binary).unwrap_or_else(|e| panic!("{}: {e}", built.binary.display()));

    let inspect = run_ok(Command::new("podman").args(["image", "inspect", &image.tag]));
    let inspect: Value = serde_json::from_str(&inspect).expect("podman image inspect JSON");
    let config = &inspect[0]["Config"];
    assert_eq!(strings(&config["Entrypoint"]), ["/ztai-agent"]);
    assert_eq!(
        strings(&config["Cmd"]),
        ["run", "--policy", "/etc/ztai/policy.yaml"]
    );
    assert!(config["ExposedPorts"].get("9469/tcp").is_some(), "{config}");
    assert_eq!(config["StopSignal"], "SIGTERM");
    let size = inspect[0]["Size"].as_u64().expect("Size");
    assert_eq!(
        deploy::image_size(&image.tag).unwrap_or_else(|e| panic!("{e}")),
        size
    );
    println!(
        "image {}: {size} bytes, agent {} bytes",
        image.tag,
        binary.len()
    );
    assert!(
        size < IMAGE_MAX_BYTES,
        "image is {size} bytes, more than {IMAGE_MAX_BYTES}"
    );
    assert!(
        inspect[0]["RootFS"]["Layers"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
    );

    // Its file system, without running a container: exactly the agent and the policy.
    let rootfs =
        PathBuf::from(run_ok(Command::new("podman").args(["image", "mount", &image.tag])).trim());
    image.mounted = true;
    let files = files_under(&rootfs);
    assert_eq!(
        files,
        ["etc/ztai/policy.yaml", "ztai-agent"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    let inside = std::fs::read(rootfs.join("ztai-agent")).expect("agent in the image");
    assert!(
        inside == binary,
        "the image's agent is not the static build"
    );
    deploy::elf_is_static(&inside).unwrap_or_else(|e| panic!("agent in the image: {e}"));
    assert_eq!(
        read(&rootfs.join("etc/ztai/policy.yaml")),
        read(&root.join(deploy::IMAGE_POLICY))
    );
    // It runs in that root with nothing else (no loader, no libc): static for real.
    let version = run_ok(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/ztai-agent", "--version"]),
    );
    assert!(version.starts_with("ztai-agent "), "{version}");
    run_ok(Command::new("chroot").arg(&rootfs).args([
        "/ztai-agent",
        "check",
        "--strict",
        "/etc/ztai/policy.yaml",
    ]));
}
