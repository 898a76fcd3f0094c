//! One `ztai-agent run` instance under the bench's cgroup subtree.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use super::sys;

const STOP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Default)]
struct LogState {
    lines: Vec<(Instant, String)>,
    closed: bool,
}

#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

pub struct Agent {
    child: Child,
    spawned: Instant,
    log: Arc<Log>,
    out_lines: Arc<AtomicU64>,
    out_first: Arc<Mutex<Option<String>>>,
    exited: bool,
}

/// What /proc says about a process.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcStats {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// utime + stime, clock ticks.
    pub cpu_ticks: u64,
    /// write-like system calls so far (/proc/PID/io `syscw`).
    pub syscw: u64,
}

impl Agent {
    /// Starts the agent on `root` (never the cgroup2 root): no pins, no control
    /// socket, metrics on an ephemeral loopback port.
    pub fn start(bin: &Path, policy: &Path, root: &Path) -> anyhow::Result<Agent> {
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup-root")
            .arg(root)
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--control-socket",
                "off",
                "--pin-dir",
                "off",
                "--detach-on-exit",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let log = Arc::new(Log::default());
        let err = child.stderr.take().expect("piped");
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut st = l.state.lock().unwrap();
                // Bounded: a chatty agent cannot grow the bench without limit.
                if st.lines.len() < 100_000 {
                    st.lines.push((Instant::now(), line));
                }
                l.changed.notify_all();
            }
            l.state.lock().unwrap().closed = true;
            l.changed.notify_all();
        });
        // stdout: one violation per line; only counted (they can arrive at
        // hundreds of thousands per second).
        let out_lines = Arc::new(AtomicU64::new(0));
        let out_first = Arc::new(Mutex::new(None));
        let mut out = child.stdout.take().expect("piped");
        // A deeper pipe: bursts of violations do not stall the agent on a full pipe.
        sys::set_pipe_size(&out, 1 << 20);
        let (n, first) = (out_lines.clone(), out_first.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let mut head: Option<Vec<u8>> = Some(Vec::new());
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        let chunk = &buf[..k];
                        n.fetch_add(count_newlines(chunk), Ordering::Relaxed);
                        if let Some(h) = head.as_mut() {
                            h.extend_from_slice(&chunk[..k.min(4096)]);
                            if let Some(end) = h.iter().position(|&b| b == b'\n') {
                                *first.lock().unwrap() =
                                    Some(String::from_utf8_lossy(&h[..end]).into_owned());
                                head = None;
                            } else if h.len() >= 4096 {
                                head = None;
                            }
                        }
                    }
                }
            }
        });
        Ok(Agent {
            child,
            spawned,
            log,
            out_lines,
            out_first,
            exited: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of stderr lines so far (an index for [`Agent::wait_msg`]).
    pub fn log_len(&self) -> usize {
        self.log.state.lock().unwrap().lines.len()
    }

    /// The first stderr JSON line at index >= `from` whose `msg` is `msg`,
    /// with the time it was read.
    pub fn wait_msg(
        &self,
        msg: &str,
        from: usize,
        timeout: Duration,
    ) -> anyhow::Result<(Instant, Value)> {
        let deadline = Instant::now() + timeout;
        let mut st = self.log.state.lock().unwrap();
        let mut seen = from;
        loop {
            while seen < st.lines.len() {
                let (t, line) = &st.lines[seen];
                seen += 1;
                if let Ok(v) = serde_json::from_str::<Value>(line)
                    && v.get("msg").and_then(Value::as_str) == Some(msg)
                {
                    return Ok((*t, v));
                }
            }
            if sys::interrupted() {
                bail!("interrupted");
            }
            if st.closed {
                drop(st);
                bail!(
                    "ztai-agent exited before logging {msg:?}\n{}",
                    self.stderr_tail(30)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || sys::interrupted() {
                drop(st);
                bail!(
                    "ztai-agent did not log {msg:?} within {timeout:?}\n{}",
                    self.stderr_tail(30)
                );
            }
            st = self
                .log
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(200)))
                .unwrap()
                .0;
        }
    }

    /// Waits for `"msg":"ready"`; returns the time from spawn to that line.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<(Duration, Value)> {
        let (t, v) = self.wait_msg("ready", 0, timeout)?;
        Ok((t - self.spawned, v))
    }

    /// SIGHUP; returns when it was sent.
    pub fn sighup(&self) -> anyhow::Result<Instant> {
        sys::signal_pid(self.pid(), sys::SIGHUP).context("SIGHUP to the agent")?;
        Ok(Instant::now())
    }

    pub fn stderr_tail(&self, n: usize) -> String {
        let st = self.log.state.lock().unwrap();
        let start = st.lines.len().saturating_sub(n);
        st.lines[start..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Violation lines printed on stdout so far.
    pub fn violations(&self) -> u64 {
        self.out_lines.load(Ordering::Relaxed)
    }

    pub fn first_violation(&self) -> Option<String> {
        self.out_first.lock().unwrap().clone()
    }

    pub fn stats(&self) -> anyhow::Result<ProcStats> {
        proc_stats(self.pid())
    }

    /// The `metrics_addr` of the ready line.
    pub fn metrics_addr(&self) -> anyhow::Result<String> {
        let (_, v) = self.wait_msg("ready", 0, Duration::from_secs(1))?;
        v.get("metrics_addr")
            .and_then(Value::as_str)
            .filter(|a| *a != "off")
            .map(str::to_string)
            .ok_or_else(|| anyhow!("ready line has no metrics_addr"))
    }

    /// GET /metrics.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let addr = self.metrics_addr()?;
        let mut s =
            TcpStream::connect(&addr).with_context(|| format!("connect to metrics at {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body).context("read /metrics")?;
        let (_, body) = body
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("bad HTTP answer from /metrics"))?;
        Ok(body.to_string())
    }

    /// SIGTERM (the agent detaches its programs), wait, SIGKILL after a deadline.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.exited {
            return Ok(());
        }
        self.exited = true;
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = sys::signal_pid(self.pid(), sys::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(status)) = self.child.try_wait() {
                    if !status.success() {
                        bail!("ztai-agent exited with {status}\n{}", self.stderr_tail(20));
                    }
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            bail!("ztai-agent ignored SIGTERM for {STOP_TIMEOUT:?}; killed");
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!(
                "ztai-agent exited early with {status}\n{}",
                self.stderr_tail(20)
            );
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("xtask bench: {e:#}");
        }
    }
}

/// Value of the first sample of `name` (optionally with a label substring) in OpenMetrics text.
pub fn metric(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let metric_name = series.split('{').next()?;
        if metric_name != name || label.is_some_and(|lab| !series.contains(lab)) {
            return None;
        }
        value.trim().parse().ok()
    })
}

pub fn proc_stats(pid: u32) -> anyhow::Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After "comm)": state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let tick = |i: usize| {
        fields
            .get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let syscw = io
        .lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(ProcStats {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        cpu_ticks: tick(14) + tick(15),
        syscw,
    })
}

/// Newlines in `buf`, eight bytes at a time: the bench is usually built
/// without optimizations, and this runs at up to hundreds of MB/s.
pub fn count_newlines(buf: &[u8]) -> u64 {
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const NL: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    // SAFETY: any bytes are a valid u64.
    let (head, words, tail) = unsafe { buf.align_to::<u64>() };
    let mut n = 0u64;
    for w in words {
        let x = w ^ NL;
        // High bit set exactly in the bytes of x that are zero.
        let zero = !(((x & LO7) + LO7) | x | LO7);
        n += u64::from(zero.count_ones());
    }
    n + head.iter().chain(tail).filter(|&&b| b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// The agent's log lines and iperf3's nested documents, read as the bench
    /// reads them.
    #[test]
    fn parses_log_lines_and_nested_documents() {
        let v: Value = serde_json::from_str(r#"{"msg":"ready","metrics_addr":"127.0.0.1:4000","rules":10,"x":[1,{"a":null}],"e":"\u00e9\"\n"}"#).unwrap();
        assert_eq!(v.get("msg").and_then(Value::as_str), Some("ready"));
        assert_eq!(v.get("rules").and_then(Value::as_u64), Some(10));
        assert_eq!(v.get("x").and_then(Value::as_array).unwrap().len(), 2);
        assert_eq!(v.get("e").and_then(Value::as_str), Some("é\"\n"));
        let n: Value =
            serde_json::from_str(r#"{"end":{"sum_received":{"bits_per_second":1.5e10}}}"#).unwrap();
        assert_eq!(
            n.pointer("/end/sum_received/bits_per_second")
                .and_then(Value::as_f64),
            Some(1.5e10)
        );
        assert!(serde_json::from_str::<Value>("{\"a\":1").is_err());
    }

    #[test]
    fn counts_newlines_exactly() {
        let mut v = Vec::new();
        for i in 0..1000u32 {
            v.extend_from_slice(format!("{{\"n\":{i}}}").as_bytes());
            v.push(if i % 3 == 0 { b'\n' } else { 0x8a });
            v.push(0x0b);
            v.push(b'\n');
        }
        for start in 0..8 {
            let s = &v[start..];
            assert_eq!(
                super::count_newlines(s),
                s.iter().filter(|&&b| b == b'\n').count() as u64
            );
        }
    }
}
