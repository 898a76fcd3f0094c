//! Running `ztai-agent run --policy FILE --cgroup-root DIR` and reading what it reports.
//!
//! Assumed agent contract (what these tests check):
//! * stdout: one JSON object per line, one line per denial (a "violation").
//! * stderr: diagnostic log lines, one JSON object per line; when every program is attached and
//!   enforcement is live it logs a line with `"msg":"ready"`.
//! * SIGTERM: detaches its programs and exits (status 0).
//! * `--metrics-addr 127.0.0.1:0`: serves /metrics, /healthz, /readyz; the "ready" line names
//!   the bound `metrics_addr`.
//! * `--control-socket PATH`: a root-only Unix socket that `ztai-agent flows --socket PATH`
//!   reads. Each agent gets its own PATH in a private temp dir (parallel tests never share the
//!   default /run/ztai/agent.sock).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::lines::{LineLog, WaitEnd};
use crate::util::{TempDir, kill_and_reap, signal, wait_child};
use crate::{Cgroup, DEFAULT_TIMEOUT, Policy, PolicyFile, READY_TIMEOUT, cgroup2_mount};

/// How long the agent gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Path of the agent binary: `$ZTAI_AGENT_BIN`, else `<dir of the test exe>/../ztai-agent`
/// (i.e. `target/<profile>/ztai-agent`).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ZTAI_AGENT_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ZTAI_AGENT_BIN={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test exe has a parent dir");
    let cand = dir.join("../ztai-agent");
    if cand.is_file() {
        return cand;
    }
    panic!(
        "ztai-agent binary not found at {} — build it first: cargo build -p ztai-agent \
         (cargo xtask test does this), or set ZTAI_AGENT_BIN",
        cand.display()
    );
}

/// What a one-shot `ztai-agent <args>` command did.
#[derive(Debug, Clone)]
pub struct CliOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for CliOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`ztai-agent {}` exited with {}
--- stdout ---
{}
--- stderr ---
{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }
}

/// Runs `ztai-agent ARGS` to completion (killed and reaped after `timeout`, then panics).
#[track_caller]
pub fn run_agent_cli(args: &[&str], timeout: Duration) -> CliOutput {
    let bin = agent_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} {}: {e}", bin.display(), args.join(" ")));
    let stdout = LineLog::capture(child.stdout.take().expect("piped stdout"));
    let stderr = LineLog::capture(child.stderr.take().expect("piped stderr"));
    let Some(status) = wait_child(&mut child, timeout) else {
        kill_and_reap(&mut child);
        panic!(
            "`ztai-agent {}` did not exit within {timeout:?}
stdout:
{}
stderr:
{}",
            args.join(" "),
            stdout.tail(40),
            stderr.tail(40)
        );
    };
    stdout.wait_closed(Duration::from_secs(2));
    stderr.wait_closed(Duration::from_secs(2));
    CliOutput {
        args: args.iter().map(|a| a.to_string()).collect(),
        status,
        stdout: stdout.snapshot().join("\n"),
        stderr: stderr.snapshot().join("\n"),
    }
}

/// A running agent. On drop: SIGTERM, wait (deadline), then SIGKILL; always reaped.
pub struct Agent {
    child: Child,
    pid: u32,
    stdout: LineLog,
    stderr: LineLog,
    policy: PolicyFile,
    cgroup_root: PathBuf,
    /// Private directory of the control socket (removed on drop, after the agent exits).
    control_dir: TempDir,
    control_socket: PathBuf,
    /// bpffs folder for this agent's pins (removed on drop).
    pin_dir: PathBuf,
    status: Option<ExitStatus>,
    /// Set once [`Agent::diagnostics`] went into a message, so drop does not print it again.
    diagnostics_shown: Cell<bool>,
}

impl Agent {
    /// Writes `policy` to a temp file and starts the agent on `root` (does not wait for ready).
    #[track_caller]
    pub fn start(policy: &Policy, root: &Cgroup) -> Agent {
        Agent::start_yaml(&policy.to_yaml(), root)
    }

    /// Like [`Agent::start`], then waits (up to [`READY_TIMEOUT`]) for `"msg":"ready"`.
    #[track_caller]
    pub fn start_ready(policy: &Policy, root: &Cgroup) -> Agent {
        let mut a = Agent::start(policy, root);
        a.wait_ready(READY_TIMEOUT);
        a
    }

    /// Starts the agent with verbatim policy YAML.
    #[track_caller]
    pub fn start_yaml(yaml: &str, root: &Cgroup) -> Agent {
        Agent::spawn(yaml, root, &[])
    }

    /// Like [`Agent::start`], but run through `wrapper`, e.g.
    /// `["setpriv", "--bounding-set", "-sys_ptrace", "--"]`. The wrapper must exec its
    /// arguments (not fork them), so the pid stays the agent's and SIGTERM reaches it.
    #[track_caller]
    pub fn start_wrapped(policy: &Policy, root: &Cgroup, wrapper: &[&str]) -> Agent {
        Agent::spawn(&policy.to_yaml(), root, wrapper)
    }

    #[track_caller]
    fn spawn(yaml: &str, root: &Cgroup, wrapper: &[&str]) -> Agent {
        let cgroup_root = root.path();
        assert!(
            cgroup_root != cgroup2_mount() && cgroup_root.starts_with(cgroup2_mount()),
            "refusing to run the agent on {} (must be a test subtree, never the root cgroup)",
            cgroup_root.display()
        );
        let bin = agent_bin();
        let policy = PolicyFile::write(yaml);
        let control_dir = TempDir::new("control");
        let control_socket = control_dir.path().join("agent.sock");
        // ... and its own bpffs pin folder, named like its temp dir (unique).
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(
            control_dir.path().file_name().expect("temp dir has a name"),
        );
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let mut child = command
            .arg("run")
            .arg("--policy")
            .arg(policy.path())
            .arg("--cgroup-root")
            .arg(&cgroup_root)
            // Tests run in parallel: each agent gets its own metrics port.
            .arg("--metrics-addr")
            .arg("127.0.0.1:0")
            // ... and its own control socket (the default /run/ztai/agent.sock is one per host).
            .arg("--control-socket")
            .arg(&control_socket)
            .arg("--pin-dir")
            .arg(&pin_dir)
            // Tests expect SIGTERM to leave nothing behind.
            .arg("--detach-on-exit")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                let wrapper: String = wrapper.iter().map(|w| format!("{w} ")).collect();
                panic!("cannot start {wrapper}{}: {e}", bin.display())
            });
        let stdout = LineLog::capture(child.stdout.take().expect("piped stdout"));
        let stderr = LineLog::capture(child.stderr.take().expect("piped stderr"));
        Agent {
            pid: child.id(),
            child,
            stdout,
            stderr,
            policy,
            cgroup_root,
            control_dir,
            control_socket,
            pin_dir,
            status: None,
            diagnostics_shown: Cell::new(false),
        }
    }

    /// This agent's bpffs pin folder.
    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pin_dir
    }

    /// Where this agent serves /metrics (from its "ready" line).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.logs()
            .iter()
            .find(|v| v.get("msg") == Some(&Value::from("ready")))
            .and_then(|v| v.get("metrics_addr")?.as_str()?.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "the agent's ready line names no metrics_addr\n{}",
                    self.diagnostics()
                )
            })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The agent's `--control-socket` path (in its own temp dir).
    pub fn control_socket(&self) -> &Path {
        debug_assert!(self.control_socket.starts_with(self.control_dir.path()));
        &self.control_socket
    }

    /// Runs `ztai-agent flows --socket <this agent's socket> ARGS` to completion.
    #[track_caller]
    pub fn flows_cli(&self, args: &[&str]) -> CliOutput {
        let sock = self.control_socket.to_str().expect("utf-8 temp path");
        let mut full = vec!["flows", "--socket", sock];
        full.extend_from_slice(args);
        run_agent_cli(&full, DEFAULT_TIMEOUT)
    }

    /// `ztai-agent flows --json` parsed; panics (with the agent's diagnostics) when the command
    /// fails or prints anything but one JSON document.
    #[track_caller]
    pub fn flows_json(&self) -> Value {
        let out = self.flows_cli(&["--json"]);
        assert!(
            out.status.success(),
            "{out}
{}",
            self.diagnostics()
        );
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "`flows --json` printed no single JSON document ({e})
{out}
{}",
                self.diagnostics()
            )
        })
    }

    pub fn policy_yaml(&self) -> &str {
        self.policy.yaml()
    }

    /// The policy file the agent was started with (reload scenarios rewrite it).
    pub fn policy_path(&self) -> &Path {
        self.policy.path()
    }

    /// The `--cgroup-root` it was given.
    pub fn cgroup_root(&self) -> &std::path::Path {
        &self.cgroup_root
    }

    /// Agent output for failure messages.
    pub fn diagnostics(&self) -> String {
        self.diagnostics_shown.set(true);
        format!(
            "agent pid {} --cgroup-root {}\npolicy:\n{}\nagent stderr (last 40 lines):\n{}\nagent stdout (last 20 lines):\n{}",
            self.pid,
            self.cgroup_root.display(),
            self.policy.yaml(),
            self.stderr.tail(40),
            self.stdout.tail(20)
        )
    }

    /// Waits until a stderr JSON line has `"msg":"ready"`. Fails (showing stderr) when the
    /// agent exits first or the deadline passes.
    #[track_caller]
    pub fn wait_ready(&mut self, timeout: Duration) {
        let r = self.stderr.wait_for(timeout, |lines| {
            lines
                .iter()
                .any(|l| {
                    serde_json::from_str::<Value>(l)
                        .is_ok_and(|v| v.get("msg") == Some(&Value::from("ready")))
                })
                .then_some(())
        });
        match r {
            Ok(()) => {}
            Err(WaitEnd::Closed) => {
                let status = wait_child(&mut self.child, Duration::from_secs(5));
                self.status = status;
                panic!(
                    "ztai-agent exited before logging \"msg\":\"ready\" (status: {status:?}) — could it \
                     load and attach its eBPF programs?\n{}",
                    self.diagnostics()
                );
            }
            Err(WaitEnd::TimedOut) => panic!(
                "ztai-agent did not log \"msg\":\"ready\" within {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Every stderr line that parses as JSON.
    pub fn logs(&self) -> Vec<Value> {
        self.stderr
            .snapshot()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Every violation line so far. Panics on a stdout line that is not a JSON object.
    #[track_caller]
    pub fn violations(&self) -> Vec<Value> {
        parse_violations(&self.stdout.snapshot())
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// Waits for a violation matching `pred` and returns it.
    #[track_caller]
    pub fn wait_violation(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let r = self
            .stdout
            .wait_for(timeout, |lines| match parse_violations(lines) {
                Ok(vs) => vs.into_iter().find(|v| pred(v)).map(Ok),
                Err(e) => Some(Err(e)),
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

    /// Waits for the violation reported for the denied probe process `pid` (`src.pid`).
    #[track_caller]
    pub fn wait_violation_from(&self, pid: u32) -> Value {
        self.wait_violation(DEFAULT_TIMEOUT, |v| v["src"]["pid"] == pid)
    }

    /// Panics if any violation so far has `src.pid == pid`.
    #[track_caller]
    pub fn assert_no_violation_from(&self, pid: u32) {
        let bad: Vec<Value> = self
            .violations()
            .into_iter()
            .filter(|v| v["src"]["pid"] == pid)
            .collect();
        assert!(
            bad.is_empty(),
            "unexpected violation(s) for pid {pid}: {bad:#?}\n{}",
            self.diagnostics()
        );
    }

    /// Whether the agent process is still running.
    pub fn is_running(&mut self) -> bool {
        self.status.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait for the agent to exit; panics if it needs SIGKILL.
    #[track_caller]
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        signal(self.pid, libc::SIGTERM);
        match wait_child(&mut self.child, STOP_TIMEOUT) {
            Some(s) => {
                self.status = Some(s);
                self.stdout.wait_closed(Duration::from_secs(2));
                self.stderr.wait_closed(Duration::from_secs(2));
                s
            }
            None => {
                self.status = kill_and_reap(&mut self.child);
                panic!(
                    "ztai-agent did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.diagnostics()
                );
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.diagnostics_shown.get() {
            eprintln!(
                "--- ztai-agent diagnostics (test failed) ---\n{}",
                self.diagnostics()
            );
        }
        if self.status.is_none() {
            if matches!(self.child.try_wait(), Ok(None)) {
                signal(self.pid, libc::SIGTERM);
                if wait_child(&mut self.child, STOP_TIMEOUT).is_none() {
                    eprintln!(
                        "ztai-agent pid {} ignored SIGTERM; sending SIGKILL",
                        self.pid
                    );
                }
            }
            self.status = kill_and_reap(&mut self.child);
        }
        // A killed agent leaves its pins (by design: enforcement outlives
        // it); remove them, as an operator would.
        if self.pin_dir.exists() {
            let _ = Command::new(agent_bin())
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .stdout(Stdio::null())
                .status();
        }
    }
}

fn parse_violations(lines: &[String]) -> Result<Vec<Value>, String> {
    lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(format!(
                "agent stdout line is not a JSON object (stdout is for violations only): {l:?}"
            )),
        })
        .collect()
}
