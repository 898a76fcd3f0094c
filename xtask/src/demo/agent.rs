//! `ztai-agent run` for the demo: started in the tracking cgroup (outside the
//! attach point), its stdout (violation lines) and stderr (log lines)
//! collected; stopped with SIGTERM so --detach-on-exit removes its pins.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::sys::{self, Placement, Proc};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

type Lines = Arc<Mutex<Vec<String>>>;

fn collect(r: impl std::io::Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut v) = sink.lock() {
                v.push(line);
            }
        }
    });
    lines
}

pub struct Agent {
    proc: Proc,
    bin: PathBuf,
    stdout: Lines,
    stderr: Lines,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_addr: Option<SocketAddr>,
    pub ready: Option<Value>,
    /// Problems seen while stopping it (reported, never hidden).
    pub stop_problems: Arc<Mutex<Vec<String>>>,
    stopped: bool,
}

pub struct Config<'a> {
    pub bin: &'a Path,
    pub policy: &'a Path,
    pub cgroup_root: &'a str,
    pub control_socket: PathBuf,
    pub pin_dir: PathBuf,
    pub cgroup: &'a Path,
}

impl Agent {
    pub fn start(c: Config) -> anyhow::Result<Agent> {
        let mut cmd = Command::new(c.bin);
        cmd.arg("run")
            .arg("--policy")
            .arg(c.policy)
            .args(["--cgroup-root", c.cgroup_root, "--metrics-addr", "127.0.0.1:0"])
            .arg("--control-socket")
            .arg(&c.control_socket)
            .arg("--pin-dir")
            .arg(&c.pin_dir)
            .arg("--detach-on-exit")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If the demo itself is killed, the agent still gets SIGTERM and detaches.
        sys::place(&mut cmd, Placement::cgroup(c.cgroup).death_signal(sys::SIGTERM));
        let mut proc = Proc::spawn("ztai-agent", &mut cmd, None)?.grace(STOP_TIMEOUT);
        let stdout = collect(proc.child_mut().stdout.take().expect("piped"));
        let stderr = collect(proc.child_mut().stderr.take().expect("piped"));
        Ok(Agent {
            proc,
            bin: c.bin.to_path_buf(),
            stdout,
            stderr,
            pin_dir: c.pin_dir,
            control_socket: c.control_socket,
            metrics_addr: None,
            ready: None,
            stop_problems: Arc::default(),
            stopped: false,
        })
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn snapshot(lines: &Lines) -> Vec<String> {
        lines.lock().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn stderr_tail(&self, n: usize) -> String {
        let v = Self::snapshot(&self.stderr);
        v[v.len().saturating_sub(n)..].join("\n")
    }

    /// Log lines at level warn or error, and lines that are not JSON.
    pub fn log_problems(&self) -> Vec<(String, String)> {
        Self::snapshot(&self.stderr)
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| match serde_json::from_str::<Value>(&l) {
                Ok(v) => match v["level"].as_str() {
                    Some(level @ ("warn" | "error")) => Some((level.to_string(), l)),
                    _ => None,
                },
                Err(_) => Some(("not JSON".to_string(), l)),
            })
            .collect()
    }

    /// Every stdout line, parsed; a line that is not a JSON object is an error
    /// (stdout is for violation reports only).
    pub fn violations(&self) -> anyhow::Result<Vec<Value>> {
        Self::snapshot(&self.stdout)
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| match serde_json::from_str(l) {
                Ok(v @ Value::Object(_)) => Ok(v),
                _ => bail!("the agent printed a stdout line that is not a JSON object: {l:?}"),
            })
            .collect()
    }

    pub fn raw_violations(&self) -> Vec<String> {
        Self::snapshot(&self.stdout)
    }

    /// Waits for the `"msg":"ready"` log line; fails with the agent's log if it exits first.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let ready = sys::wait_for("ztai-agent to log \"msg\":\"ready\"", READY_TIMEOUT, || {
            if let Some(status) = self.proc.exited() {
                std::thread::sleep(Duration::from_millis(100));
                bail!("ztai-agent exited ({status}) before it was ready; its log:\n{}", sys::indent(&self.stderr_tail(30)));
            }
            Ok(Self::snapshot(&self.stderr).iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| v["msg"].as_str() == Some("ready")))
        })
        .with_context(|| format!("agent log:\n{}", sys::indent(&self.stderr_tail(30))))?;
        self.metrics_addr = ready["metrics_addr"].as_str().and_then(|a| a.parse().ok());
        self.ready = Some(ready);
        Ok(())
    }

    /// Fails if the agent has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.proc.exited() {
            bail!("ztai-agent exited ({status}); its log:\n{}", sys::indent(&self.stderr_tail(30)));
        }
        Ok(())
    }

    /// `ztai-agent flows --socket … --once`.
    pub fn flows(&self) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("flows").arg("--socket").arg(&self.control_socket).arg("--once").env("COLUMNS", "160");
        let (status, out, err) = sys::run_capture(&mut cmd, Duration::from_secs(15))?;
        if !status.success() {
            bail!("`ztai-agent flows --socket {} --once` failed ({status}): {}", self.control_socket.display(), err.trim());
        }
        Ok(out)
    }

    /// GET /metrics (plain HTTP/1.0 over TCP; the demo process is unlabeled).
    pub fn metrics(&self) -> anyhow::Result<String> {
        let addr = self.metrics_addr.ok_or_else(|| anyhow::anyhow!("the agent's ready line names no metrics_addr"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("cannot connect to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let (head, body) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
        if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
            bail!("GET http://{addr}/metrics: {}", head.lines().next().unwrap_or(""));
        }
        Ok(body.to_string())
    }

    /// SIGTERM (the agent detaches and, with --detach-on-exit, removes its
    /// pins), then checks the pin folder is gone; anything else is reported.
    pub fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        let status = self.proc.stop();
        let mut problems = Vec::new();
        match status {
            Some(s) if s.success() => {}
            Some(s) => problems
                .push(format!("ztai-agent exited with {s} after SIGTERM (expected 0); log:\n{}", sys::indent(&self.stderr_tail(15)))),
            None => problems.push("ztai-agent could not be reaped".into()),
        }
        if self.pin_dir.exists() {
            let left: Vec<String> = std::fs::read_dir(&self.pin_dir)
                .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            problems.push(format!(
                "ztai-agent --detach-on-exit left its pin folder {} behind ({} entries: {}); removing it with `ztai-agent uninstall`",
                self.pin_dir.display(),
                left.len(),
                left.join(" ")
            ));
            let _ = Command::new(&self.bin).arg("uninstall").arg("--pin-dir").arg(&self.pin_dir).stdout(Stdio::null()).status();
            let _ = std::fs::remove_dir(&self.pin_dir);
        }
        if let Ok(mut p) = self.stop_problems.lock() {
            p.extend(problems);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}
