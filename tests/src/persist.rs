//! Agents whose enforcement outlives them: `ztai-agent run` *without* `--detach-on-exit`, on a
//! bpffs pin folder the test chooses and keeps across restarts, SIGKILL and SIGTERM on demand,
//! `ztai-agent uninstall`, and what is attached/pinned meanwhile.
//!
//! Assumed agent contract:
//! * `run --pin-dir P`: maps pinned under `P/maps/ZTAI_*`, links under `P/links/g<generation>/<program>`;
//!   one agent per pin folder (a second one fails: "another ztai-agent is using the pin folder …").
//! * SIGKILL: the pinned links keep the programs attached, enforcement continues. A new agent on
//!   the same `P` logs `{"msg":"adopted pinned state of a previous agent","adopted_generation":N,
//!   "generation":N+1,"released_links":K}` and ends up with exactly one set of programs attached.
//! * SIGTERM without `--detach-on-exit`: exits 0, enforcement stays (pinned).
//! * `uninstall --pin-dir P`: removes every link, map and pin under `P` (and `P`), prints
//!   `removed X links and Y maps pinned under P`.
//!
//! [`PersistentAgent`] owns its pin folder `/sys/fs/bpf/ztai-tests-pin-<pid>-<n>`: on drop it
//! SIGKILLs the running agent (if any) and runs `ztai-agent uninstall --pin-dir` (then fails
//! loudly if anything is left there).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::Duration;

use serde_json::Value;

use crate::agent::agent_bin;
use crate::cgroup::stale_owner_pid;
use crate::lines::{LineLog, WaitEnd};
use crate::metrics::{Sample, http_get, parse_samples, sample_value};
use crate::util::{
    TempDir, kill_and_reap, pid_alive, signal, try_wait_until, unique_n, wait_child,
};
use crate::{
    Cgroup, CliOutput, DEFAULT_TIMEOUT, Policy, PolicyFile, Probe, ProbeCmd, ProbeOutcome,
    READY_TIMEOUT, cgroup2_mount, run_agent_cli,
};

/// Where bpffs is mounted; every pin folder of these tests is a direct child.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Name prefix of the pin folders [`PersistentAgent`] creates.
const PIN_PREFIX: &str = "ztai-tests-pin-";

/// How long an agent gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// `msg` of the adoption log line.
pub const ADOPTED_MSG: &str = "adopted pinned state of a previous agent";

/// `msg` of an applied policy.
pub const APPLIED_MSG: &str = "policy applied";

/// The cgroup attach types the agent uses (values of `enum bpf_attach_type`), with the names
/// bpftool prints.
pub const AGENT_ATTACH_TYPES: [(u32, &str); 11] = [
    (0, "cgroup_inet_ingress"),
    (1, "cgroup_inet_egress"),
    (10, "cgroup_inet4_connect"),
    (11, "cgroup_inet6_connect"),
    (12, "cgroup_inet4_post_bind"),
    (13, "cgroup_inet6_post_bind"),
    (14, "cgroup_udp4_sendmsg"),
    (15, "cgroup_udp6_sendmsg"),
    (19, "cgroup_udp4_recvmsg"),
    (20, "cgroup_udp6_recvmsg"),
    (34, "cgroup_inet_sock_release"),
];

/// `union bpf_attr`, BPF_PROG_QUERY variant (64 bytes; newer fields stay zero).
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Ids of the programs attached *directly* to `cgroup` for `attach_type` (BPF_PROG_QUERY).
pub fn attached_prog_ids(cgroup: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = File::open(cgroup)?;
    let mut ids = vec![0u32; 256];
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: bpf(BPF_PROG_QUERY) reads the attr we pass (its exact size) and writes at most
    // prog_cnt ids into `ids`, which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// Every program attached directly to any cgroup of the subtree at `root`, for the agent's
/// attach types: `(cgroup dir, attach type name, program ids)`, non-empty ones only.
pub fn subtree_programs(root: &Path) -> Vec<(PathBuf, &'static str, Vec<u32>)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        out.push(dir.to_path_buf());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut dirs = Vec::new();
    walk(root, &mut dirs);
    let mut out = Vec::new();
    for d in dirs {
        for (t, name) in AGENT_ATTACH_TYPES {
            let ids = attached_prog_ids(&d, t)
                .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {name} on {}: {e}", d.display()));
            if !ids.is_empty() {
                out.push((d.clone(), name, ids));
            }
        }
    }
    out
}

/// Asserts that exactly one program per agent attach type is attached under the subtree, all at
/// its root (the attach point), and returns them by attach type name.
#[track_caller]
pub fn assert_one_program_set(root: &Path, context: &str) -> BTreeMap<&'static str, u32> {
    let found = subtree_programs(root);
    let mut set = BTreeMap::new();
    let mut problems = Vec::new();
    for (dir, name, ids) in &found {
        if dir != root {
            problems.push(format!(
                "{name} attached to {} (not the attach point)",
                dir.display()
            ));
        } else if ids.len() != 1 {
            problems.push(format!("{} programs for {name}: ids {ids:?}", ids.len()));
        } else {
            set.insert(*name, ids[0]);
        }
    }
    for (t, name) in AGENT_ATTACH_TYPES {
        if !found.iter().any(|(d, n, _)| d == root && *n == name) {
            problems.push(format!("no program for {name} (attach type {t})"));
        }
    }
    assert!(
        problems.is_empty(),
        "{context}: expected exactly one set of ztai programs (one per attach type) at {}, found: \
         {problems:#?}\nall attached under the subtree: {found:#?}\nbpftool cgroup tree:\n{}",
        root.display(),
        bpftool_tree(root)
    );
    set
}

/// `bpftool cgroup tree <root>` (for failure messages).
pub fn bpftool_tree(root: &Path) -> String {
    match Command::new("bpftool")
        .arg("cgroup")
        .arg("tree")
        .arg(root)
        .output()
    {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("<cannot run bpftool: {e}>"),
    }
}

/// Every path under `dir` (relative, sorted; directories end with '/'); empty when `dir` does
/// not exist.
pub fn pin_entries(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(base)
                .expect("entry under base")
                .display()
                .to_string();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Once per process: `ztai-agent uninstall` the pin folders `ztai-tests-pin-<pid>-<n>` of test
/// processes that no longer exist (e.g. killed by a CI timeout). Only that exact name form.
fn sweep_stale_pin_dirs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(BPFFS) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = stale_owner_pid(&name, PIN_PREFIX) else {
                continue;
            };
            if pid != std::process::id() && !pid_alive(pid) {
                let out = Command::new(agent_bin())
                    .arg("uninstall")
                    .arg("--pin-dir")
                    .arg(e.path())
                    .output();
                if !e.path().exists() {
                    continue;
                }
                eprintln!(
                    "warning: cannot sweep stale pin folder {}: {out:?}",
                    e.path().display()
                );
            }
        }
    });
}

/// One `ztai-agent run` process of a [`PersistentAgent`].
struct Run {
    child: Child,
    pid: u32,
    stdout: LineLog,
    stderr: LineLog,
    status: Option<ExitStatus>,
}

impl Run {
    fn is_running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }
}

/// An agent that keeps its enforcement pinned: started without `--detach-on-exit` on a pin
/// folder owned by this guard and reused by every (re)start.
pub struct PersistentAgent {
    policy: PolicyFile,
    cgroup_root: PathBuf,
    /// Private directory of the control socket (kept for every run, removed on drop).
    _control_dir: TempDir,
    control_socket: PathBuf,
    pin_dir: PathBuf,
    extra_args: Vec<String>,
    run: Option<Run>,
    /// Summaries of earlier runs (pid, status, stderr tail), for diagnostics.
    history: Vec<String>,
    diagnostics_shown: Cell<bool>,
}

impl PersistentAgent {
    /// Prepares (does not start) an agent for `policy` on the test subtree `root`, with its own
    /// control socket and a fresh pin folder `/sys/fs/bpf/ztai-tests-pin-<pid>-<n>`.
    #[track_caller]
    pub fn new(policy: &Policy, root: &Cgroup) -> PersistentAgent {
        PersistentAgent::new_yaml(&policy.to_yaml(), root)
    }

    #[track_caller]
    pub fn new_yaml(yaml: &str, root: &Cgroup) -> PersistentAgent {
        let cgroup_root = root.path();
        assert!(
            cgroup_root != cgroup2_mount() && cgroup_root.starts_with(cgroup2_mount()),
            "refusing to run the agent on {} (must be a test subtree, never the root cgroup)",
            cgroup_root.display()
        );
        sweep_stale_pin_dirs();
        let pin_dir =
            PathBuf::from(BPFFS).join(format!("{PIN_PREFIX}{}-{}", std::process::id(), unique_n()));
        assert!(
            !pin_dir.exists(),
            "pin folder {} already exists (left by an earlier process with our pid?)",
            pin_dir.display()
        );
        let control_dir = TempDir::new("pcontrol");
        let control_socket = control_dir.path().join("agent.sock");
        PersistentAgent {
            policy: PolicyFile::write(yaml),
            cgroup_root,
            _control_dir: control_dir,
            control_socket,
            pin_dir,
            extra_args: Vec::new(),
            run: None,
            history: Vec::new(),
            diagnostics_shown: Cell::new(false),
        }
    }

    /// `--map-size NAME=N` for every later start.
    pub fn map_size(mut self, name: &str, entries: u32) -> PersistentAgent {
        self.extra_args.push("--map-size".into());
        self.extra_args.push(format!("{name}={entries}"));
        self
    }

    /// Like [`PersistentAgent::new`], then starts it and waits for ready.
    #[track_caller]
    pub fn start_ready(policy: &Policy, root: &Cgroup) -> PersistentAgent {
        let mut a = PersistentAgent::new(policy, root);
        a.start();
        a.wait_ready(READY_TIMEOUT);
        a
    }

    /// This agent's pin folder (the same for every run).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn policy_path(&self) -> &Path {
        self.policy.path()
    }

    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    fn run_args(&self, control_socket: &Path) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--policy".into(),
            self.policy.path().display().to_string(),
            "--cgroup-root".into(),
            self.cgroup_root.display().to_string(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--control-socket".into(),
            control_socket.display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Starts a new agent process (no `--detach-on-exit`); panics if one is still running.
    #[track_caller]
    pub fn start(&mut self) {
        if let Some(run) = &mut self.run {
            assert!(
                !run.is_running(),
                "agent pid {} is still running; kill it before starting another",
                run.pid
            );
        }
        self.retire_run();
        let bin = agent_bin();
        let mut child = Command::new(&bin)
            .args(self.run_args(&self.control_socket))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = LineLog::capture(child.stdout.take().expect("piped stdout"));
        let stderr = LineLog::capture(child.stderr.take().expect("piped stderr"));
        self.run = Some(Run {
            pid: child.id(),
            child,
            stdout,
            stderr,
            status: None,
        });
    }

    /// Moves the current (finished) run into the history.
    fn retire_run(&mut self) {
        if let Some(mut run) = self.run.take() {
            let status = run.status.or_else(|| kill_and_reap(&mut run.child));
            self.history.push(format!(
                "earlier agent pid {} ({:?}), stderr (last 15 lines):\n{}",
                run.pid,
                status,
                run.stderr.tail(15)
            ));
        }
    }

    fn run(&self) -> &Run {
        self.run.as_ref().expect("the agent was never started")
    }

    /// Pid of the current agent process.
    pub fn pid(&self) -> u32 {
        self.run().pid
    }

    pub fn is_running(&mut self) -> bool {
        self.run.as_mut().is_some_and(Run::is_running)
    }

    /// Waits for the current run's `"msg":"ready"` line and returns it.
    #[track_caller]
    pub fn wait_ready(&mut self, timeout: Duration) -> Value {
        let r = self.run().stderr.wait_for(timeout, |lines| {
            lines.iter().find_map(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .filter(|v| v["msg"] == "ready")
            })
        });
        match r {
            Ok(v) => v,
            Err(WaitEnd::Closed) => {
                let run = self.run.as_mut().expect("started");
                let status = wait_child(&mut run.child, Duration::from_secs(5));
                run.status = status;
                panic!(
                    "ztai-agent exited before logging \"msg\":\"ready\" (status: {status:?})\n{}",
                    self.diagnostics()
                );
            }
            Err(WaitEnd::TimedOut) => panic!(
                "ztai-agent did not log \"msg\":\"ready\" within {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Starts a new agent on the same pin folder and waits for it to be ready; returns the
    /// ready line.
    #[track_caller]
    pub fn restart_ready(&mut self) -> Value {
        self.start();
        self.wait_ready(READY_TIMEOUT)
    }

    /// SIGKILL the current agent and reap it (no chance to clean up anything).
    #[track_caller]
    pub fn sigkill(&mut self) -> ExitStatus {
        let run = self.run.as_mut().expect("the agent was never started");
        if let Some(s) = run.status {
            return s;
        }
        signal(run.pid, libc::SIGKILL);
        let status = wait_child(&mut run.child, STOP_TIMEOUT).unwrap_or_else(|| {
            panic!(
                "agent pid {} survived SIGKILL for {STOP_TIMEOUT:?}",
                run.pid
            )
        });
        run.status = Some(status);
        run.stdout.wait_closed(Duration::from_secs(2));
        run.stderr.wait_closed(Duration::from_secs(2));
        status
    }

    /// SIGTERM the current agent and wait for it to exit; panics if it does not within 15 s.
    #[track_caller]
    pub fn sigterm(&mut self) -> ExitStatus {
        let run = self.run.as_mut().expect("the agent was never started");
        if let Some(s) = run.status {
            return s;
        }
        signal(run.pid, libc::SIGTERM);
        match wait_child(&mut run.child, STOP_TIMEOUT) {
            Some(s) => {
                run.status = Some(s);
                run.stdout.wait_closed(Duration::from_secs(2));
                run.stderr.wait_closed(Duration::from_secs(2));
                s
            }
            None => {
                run.status = kill_and_reap(&mut run.child);
                panic!(
                    "ztai-agent did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.diagnostics()
                );
            }
        }
    }

    /// Every stderr line of the current run that parses as JSON.
    pub fn logs(&self) -> Vec<Value> {
        self.run()
            .stderr
            .snapshot()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Current-run log lines whose `msg` is `msg`.
    pub fn logs_with_msg(&self, msg: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| v["msg"] == msg)
            .collect()
    }

    /// Waits for a current-run stderr JSON line satisfying `pred`.
    #[track_caller]
    pub fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut seen = 0;
        let r = self.run().stderr.wait_for(timeout, |lines| {
            let hit = lines[seen..]
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| pred(v));
            seen = lines.len();
            hit
        });
        r.unwrap_or_else(|end| {
            panic!(
                "no agent log line {what} ({}) within {timeout:?}\n{}",
                match end {
                    WaitEnd::Closed => "the agent exited",
                    WaitEnd::TimedOut => "timed out",
                },
                self.diagnostics()
            )
        })
    }

    /// Number of stdout lines of the current run so far (a start index for
    /// [`PersistentAgent::wait_violation_after`]).
    pub fn violation_count(&self) -> usize {
        self.run().stdout.snapshot().len()
    }

    /// Every violation (stdout JSON object) of the current run.
    #[track_caller]
    pub fn violations(&self) -> Vec<Value> {
        self.run()
            .stdout
            .snapshot()
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match serde_json::from_str::<Value>(l) {
                Ok(v) if v.is_object() => v,
                _ => panic!(
                    "agent stdout line is not a JSON object (stdout is for violations only): {l:?}\n{}",
                    self.diagnostics()
                ),
            })
            .collect()
    }

    /// Waits for a violation of the current run matching `pred`, looking only at stdout lines
    /// from index `from` on (each line is parsed once).
    #[track_caller]
    pub fn wait_violation_after(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut seen = from;
        let r = self.run().stdout.wait_for(timeout, |lines| {
            let start = seen.min(lines.len());
            seen = lines.len();
            lines[start..].iter().find_map(|l| {
                let v: Value = match serde_json::from_str(l) {
                    Ok(v) => v,
                    Err(_) if l.trim().is_empty() => return None,
                    Err(e) => {
                        return Some(Err(format!("agent stdout line is not JSON ({e}): {l:?}")));
                    }
                };
                pred(&v).then_some(Ok(v))
            })
        });
        match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => panic!("{e}\n{}", self.diagnostics()),
            Err(WaitEnd::Closed) => panic!(
                "ztai-agent exited (stdout closed) while waiting for a violation\n{}",
                self.diagnostics()
            ),
            Err(WaitEnd::TimedOut) => panic!(
                "no matching violation on the agent's stdout within {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Waits for the violation the current run reports for process `pid`.
    #[track_caller]
    pub fn wait_violation_from(&self, pid: u32) -> Value {
        self.wait_violation_after(0, DEFAULT_TIMEOUT, |v| v["src"]["pid"] == pid)
    }

    /// The current run's metrics address (from its ready line).
    #[track_caller]
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.logs()
            .iter()
            .find(|v| v["msg"] == "ready")
            .and_then(|v| v.get("metrics_addr")?.as_str()?.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the agent's ready line names no metrics_addr\n{}",
                    self.diagnostics()
                )
            })
    }

    /// Polls `/metrics` until `name` (no labels) is at least `want`; returns the value.
    #[track_caller]
    pub fn wait_metric_at_least(&self, name: &str, want: f64, timeout: Duration) -> f64 {
        let addr = self.metrics_addr();
        let mut last = (None, String::new());
        let r = try_wait_until(timeout, || {
            let resp = http_get(addr, "/metrics").ok()?;
            let samples: Vec<Sample> = parse_samples(&resp.body).ok()?;
            let v = sample_value(&samples, name, &[]);
            last = (v, resp.body);
            v.filter(|v| *v >= want)
        });
        r.unwrap_or_else(|| {
            panic!(
                "{name} did not reach {want} within {timeout:?} (last value: {:?})\n--- last /metrics ---\n{}\n{}",
                last.0,
                last.1,
                self.diagnostics()
            )
        })
    }

    /// Writes `yaml` beside the policy file and renames it over it (as editors do).
    #[track_caller]
    pub fn replace_policy(&self, yaml: &str) {
        let path = self.policy.path();
        let name = path
            .file_name()
            .expect("policy file name")
            .to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.new"));
        let mut f =
            File::create(&tmp).unwrap_or_else(|e| panic!("cannot create {}: {e}", tmp.display()));
        f.write_all(yaml.as_bytes())
            .and_then(|()| f.sync_all())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        drop(f);
        std::fs::rename(&tmp, path).unwrap_or_else(|e| {
            panic!(
                "cannot rename {} over {}: {e}",
                tmp.display(),
                path.display()
            )
        });
    }

    /// Waits for `"msg":"policy applied","generation":<generation>` in the current run.
    #[track_caller]
    pub fn wait_policy_applied(&self, generation: u64, timeout: Duration) -> Value {
        self.wait_log(
            &format!("{{\"msg\":\"{APPLIED_MSG}\",\"generation\":{generation}}}"),
            timeout,
            |v| v["msg"] == APPLIED_MSG && v["generation"] == generation,
        )
    }

    /// Runs a second `ztai-agent run` on the same pin folder (its own control socket and metrics
    /// port, so only the pin folder is shared) and waits for it to exit.
    #[track_caller]
    pub fn run_competitor(&self) -> CliOutput {
        let dir = TempDir::new("pcontrol2");
        let args = self.run_args(&dir.path().join("agent.sock"));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_agent_cli(&args, READY_TIMEOUT)
    }

    /// `ztai-agent uninstall --pin-dir <this agent's pin folder>`; the agent must not be running.
    #[track_caller]
    pub fn uninstall(&mut self) -> CliOutput {
        assert!(
            !self.is_running(),
            "uninstall while agent pid {} still runs",
            self.pid()
        );
        let dir = self.pin_dir.display().to_string();
        run_agent_cli(&["uninstall", "--pin-dir", &dir], DEFAULT_TIMEOUT)
    }

    /// Link folders `links/g<N>` under the pin folder with their number of entries, sorted.
    pub fn link_generations(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = std::fs::read_dir(self.pin_dir.join("links"))
            .map(|it| {
                it.flatten()
                    .map(|e| {
                        let n = std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0);
                        (e.file_name().to_string_lossy().into_owned(), n)
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Agent output for failure messages (current run, and a summary of earlier ones).
    pub fn diagnostics(&self) -> String {
        self.diagnostics_shown.set(true);
        let (pid, stderr, stdout) = match &self.run {
            Some(r) => (r.pid.to_string(), r.stderr.tail(40), r.stdout.tail(10)),
            None => ("-".into(), String::new(), String::new()),
        };
        format!(
            "persistent agent (current pid {pid}) --cgroup-root {} --pin-dir {}\npin folder: {:?}\n\
             policy file now:\n{}\n{}\ncurrent agent stderr (last 40 lines):\n{stderr}\n\
             current agent stdout (last 10 lines):\n{stdout}",
            self.cgroup_root.display(),
            self.pin_dir.display(),
            pin_entries(&self.pin_dir),
            std::fs::read_to_string(self.policy.path()).unwrap_or_default(),
            self.history.join("\n"),
        )
    }
}

impl Drop for PersistentAgent {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.diagnostics_shown.get() {
            eprintln!(
                "--- persistent ztai-agent diagnostics (test failed) ---\n{}",
                self.diagnostics()
            );
        }
        if let Some(run) = &mut self.run
            && run.status.is_none()
        {
            signal(run.pid, libc::SIGKILL);
            run.status = kill_and_reap(&mut run.child);
        }
        if !self.pin_dir.exists() {
            return;
        }
        // Enforcement outlives a killed agent by design: remove it, as an operator would.
        let out = Command::new(agent_bin())
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .output();
        if !self.pin_dir.exists() {
            return;
        }
        let left = pin_entries(&self.pin_dir);
        // Last resort so nothing stays attached: unlinking a pinned link detaches it. Only our
        // own folder, which uninstall should have removed.
        debug_assert!(self.pin_dir.starts_with(BPFFS));
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let msg = format!(
            "`ztai-agent uninstall --pin-dir {}` left {left:?} ({out:?}); removed them by hand",
            self.pin_dir.display()
        );
        if std::thread::panicking() {
            eprintln!("{msg}");
        } else {
            panic!("{msg}");
        }
    }
}

/// One line of `ztai-probe tcp-loop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopAttempt {
    pub i: u64,
    pub addr: String,
    /// `None` for success, else the errno name.
    pub err: Option<String>,
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Parses `attempt <i> <addr> ok <start> <end>` / `attempt <i> <addr> err <NAME> <start> <end> ...`.
pub fn parse_loop_attempt(line: &str) -> Option<LoopAttempt> {
    let mut w = line.split_whitespace();
    if w.next()? != "attempt" {
        return None;
    }
    let i = w.next()?.parse().ok()?;
    let addr = w.next()?.to_string();
    let err = match w.next()? {
        "ok" => None,
        "err" => Some(w.next()?.to_string()),
        _ => return None,
    };
    let start_ns = w.next()?.parse().ok()?;
    let end_ns = w.next()?.parse().ok()?;
    Some(LoopAttempt {
        i,
        addr,
        err,
        start_ns,
        end_ns,
    })
}

impl ProbeCmd {
    /// `tcp-loop ADDR...`: a fresh TCP connect + echo per attempt, round-robin over `targets`,
    /// one `attempt ...` line each, until stopped.
    pub fn tcp_loop<S: AsRef<str>>(targets: &[S], timeout_ms: u64, interval_ms: u64) -> ProbeCmd {
        let mut args: Vec<String> = vec!["tcp-loop".into()];
        args.extend(targets.iter().map(|t| t.as_ref().to_string()));
        args.extend([
            "--timeout-ms".into(),
            timeout_ms.to_string(),
            "--interval-ms".into(),
            interval_ms.to_string(),
        ]);
        ProbeCmd::new(args)
    }
}

impl Probe {
    /// Every `attempt ...` line of a `tcp-loop` so far.
    pub fn loop_attempts(&self) -> Vec<LoopAttempt> {
        self.lines()
            .iter()
            .filter_map(|l| parse_loop_attempt(l))
            .collect()
    }

    /// SIGTERM (a long-running probe such as `tcp-loop`), then collect everything it printed.
    #[track_caller]
    pub fn sigterm_and_collect(self) -> ProbeOutcome {
        signal(self.pid(), libc::SIGTERM);
        self.finish(DEFAULT_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loop_lines() {
        assert_eq!(
            parse_loop_attempt("attempt 3 127.0.0.1:5 ok 10 20"),
            Some(LoopAttempt {
                i: 3,
                addr: "127.0.0.1:5".into(),
                err: None,
                start_ns: 10,
                end_ns: 20
            })
        );
        assert_eq!(
            parse_loop_attempt(
                "attempt 4 [::1]:6 err EPERM 30 31 connect: Operation not permitted"
            ),
            Some(LoopAttempt {
                i: 4,
                addr: "[::1]:6".into(),
                err: Some("EPERM".into()),
                start_ns: 30,
                end_ns: 31
            })
        );
        assert_eq!(parse_loop_attempt("looping 2 targets"), None);
    }

    #[test]
    fn the_query_attr_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<QueryAttr>(), 64);
    }
}
