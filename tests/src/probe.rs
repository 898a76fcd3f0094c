//! Spawning the `ztai-probe` workload inside a cgroup and/or a network namespace.

use std::ffi::CString;
use std::fmt;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::lines::{LineLog, WaitEnd};
use crate::util::kill_and_reap;
use crate::{Cgroup, DEFAULT_TIMEOUT, Netns};

/// Probe exit codes (see `src/bin/ztai-probe.rs`).
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 2;
    pub const EPERM: i32 = 3;
    pub const ECONNREFUSED: i32 = 4;
    pub const OTHER: i32 = 5;
    pub const NO_REPLY: i32 = 6;
    pub const TIMEOUT: i32 = 7;
}

/// Path of the `ztai-probe` binary: `$ZTAI_PROBE_BIN`, else `<dir of the test exe>/../ztai-probe`
/// (cargo builds it next to the test binaries' `deps/` directory).
pub fn probe_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ZTAI_PROBE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("test exe has a parent dir");
    for cand in [dir.join("ztai-probe"), dir.join("../ztai-probe")] {
        if cand.is_file() {
            return cand;
        }
    }
    panic!(
        "ztai-probe binary not found next to {} — build it first: cargo build -p ztai-tests --bins \
         (cargo test -p ztai-tests does this), or set ZTAI_PROBE_BIN",
        exe.display()
    );
}

/// What to run: probe arguments plus where (cgroup, netns).
#[derive(Debug, Clone)]
pub struct ProbeCmd {
    args: Vec<String>,
    cgroup: Option<(PathBuf, String)>,
    netns: Option<(PathBuf, String)>,
}

impl ProbeCmd {
    pub fn new<I, S>(args: I) -> ProbeCmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        ProbeCmd {
            args: args.into_iter().map(|s| s.as_ref().to_string()).collect(),
            cgroup: None,
            netns: None,
        }
    }

    /// `tcp-listen ADDR` — a TCP echo server.
    pub fn tcp_listen(addr: impl fmt::Display) -> ProbeCmd {
        ProbeCmd::new(["tcp-listen".to_string(), addr.to_string()])
    }

    /// `tcp-connect ADDR` — connect + one echo round trip.
    pub fn tcp_connect(addr: impl fmt::Display) -> ProbeCmd {
        ProbeCmd::new(["tcp-connect".to_string(), addr.to_string()])
    }

    /// `udp-echo ADDR` — a UDP echo server (replies with sendto() to the sender).
    pub fn udp_echo(addr: impl fmt::Display) -> ProbeCmd {
        ProbeCmd::new(["udp-echo".to_string(), addr.to_string()])
    }

    /// `udp-send ADDR` — one datagram with sendto() on an unconnected socket.
    pub fn udp_send(addr: impl fmt::Display) -> ProbeCmd {
        ProbeCmd::new(["udp-send".to_string(), addr.to_string()])
    }

    /// `raw-recv IP --proto N...` — one `socket(AF_INET, SOCK_RAW, N)` per protocol, bound to
    /// `ip` (any address for 0.0.0.0); prints `listening <ip> proto <N,...>`, then
    /// `recv <proto> <src ip> <payload>` per packet (see [`is_raw_recv_line`]). On each
    /// wake-up it drains the sockets in the order of `protos`: a packet of an earlier protocol
    /// queued before one of a later protocol is printed first.
    pub fn raw_recv(ip: std::net::Ipv4Addr, protos: &[u8]) -> ProbeCmd {
        let mut cmd = ProbeCmd::new(["raw-recv".to_string(), ip.to_string()]);
        for p in protos {
            cmd = cmd.arg("--proto").arg(p.to_string());
        }
        cmd
    }

    /// `raw-send IP --proto N` — one raw IPv4 packet of protocol `proto` to `ip` carrying
    /// `ztai-probe raw <pid>` ([`raw_payload`]); for protocol 1 an ICMP echo request with it.
    /// [`ProbeCmd::bind`] takes `IP` or `IP:0` here.
    pub fn raw_send(ip: std::net::Ipv4Addr, proto: u8) -> ProbeCmd {
        ProbeCmd::new(["raw-send".to_string(), ip.to_string()])
            .arg("--proto")
            .arg(proto.to_string())
    }

    /// tcp-connect: close with SO_LINGER {1, 0}, so the connection ends with a RST and leaves no
    /// TIME_WAIT; the same [`ProbeCmd::bind`] address and port can then open the same 4-tuple
    /// again at once (the probe also sets SO_REUSEADDR before binding).
    pub fn reset(self) -> ProbeCmd {
        self.arg("--reset")
    }

    /// Appends a raw argument (e.g. `--connect`, `--expect-reply`).
    pub fn arg(mut self, a: impl AsRef<str>) -> ProbeCmd {
        self.args.push(a.as_ref().to_string());
        self
    }

    /// UDP: connect() then send() instead of sendto().
    pub fn connected(self) -> ProbeCmd {
        self.arg("--connect")
    }

    /// UDP: wait (up to 5 s) for the echo; exit 6 when none comes.
    pub fn expect_reply(self) -> ProbeCmd {
        self.arg("--expect-reply")
    }

    /// Client I/O deadline (connect, reads, UDP replies) instead of the default 5 s. A TCP
    /// handshake that does not complete in time exits 7 (`err ETIMEDOUT ...`).
    pub fn timeout_ms(self, ms: u64) -> ProbeCmd {
        self.arg("--timeout-ms").arg(ms.to_string())
    }

    /// UDP: send `n` datagrams from one socket (each waiting for its echo with
    /// [`ProbeCmd::expect_reply`]).
    pub fn count(self, n: u32) -> ProbeCmd {
        self.arg("--count").arg(n.to_string())
    }

    /// TCP: upload `k` bytes (after a short header line) instead of the echo round trip; the
    /// probe prints `sent <header + k> bytes` and exits 0 once the server acknowledged them all.
    pub fn send_bytes(self, k: u64) -> ProbeCmd {
        self.arg("--send-bytes").arg(k.to_string())
    }

    /// Bind the client socket to `addr` first (port 0 allowed); the probe prints `bound <addr>`.
    pub fn bind(self, addr: impl fmt::Display) -> ProbeCmd {
        self.arg("--bind").arg(addr.to_string())
    }

    /// Run inside `cg`: the child writes "0" to `<cg>/cgroup.procs` before exec, so it is in
    /// the cgroup before it creates any socket.
    pub fn in_cgroup(mut self, cg: &Cgroup) -> ProbeCmd {
        self.cgroup = Some((cg.path().join("cgroup.procs"), cg.rel_path().to_string()));
        self
    }

    /// Run inside the network namespace (setns(2) before exec, so the pid is the probe's own).
    pub fn in_netns(mut self, ns: &Netns) -> ProbeCmd {
        self.netns = Some((ns.path(), ns.name().to_string()));
        self
    }

    fn describe(&self) -> String {
        let mut d = format!("ztai-probe {}", self.args.join(" "));
        if let Some((_, rel)) = &self.cgroup {
            d.push_str(&format!(" [cgroup /{rel}]"));
        }
        if let Some((_, name)) = &self.netns {
            d.push_str(&format!(" [netns {name}]"));
        }
        d
    }

    /// Starts the probe; the returned guard kills and reaps it on drop.
    #[track_caller]
    pub fn spawn(self) -> Probe {
        let desc = self.describe();
        let mut cmd = Command::new(probe_bin());
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());

        let procs_path = self
            .cgroup
            .as_ref()
            .map(|(p, _)| CString::new(p.as_os_str().as_bytes()).expect("cgroup path has NUL"));
        let ns_file = self.netns.as_ref().map(|(p, name)| {
            std::fs::File::open(p).unwrap_or_else(|e| panic!("cannot open netns {name}: {e}"))
        });
        let ns_fd = ns_file.as_ref().map(|f| f.as_raw_fd());
        if procs_path.is_some() || ns_fd.is_some() {
            // SAFETY: the closure only calls async-signal-safe functions (setns, open, write,
            // close) on data prepared before fork; it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if let Some(fd) = ns_fd
                        && libc::setns(fd, libc::CLONE_NEWNET) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(path) = &procs_path {
                        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                        if fd < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                        let err = std::io::Error::last_os_error();
                        libc::close(fd);
                        if n != 1 {
                            return Err(err);
                        }
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc} (cgroup/netns entry?): {e}"));
        drop(ns_file);
        let stdout = LineLog::capture(child.stdout.take().expect("piped stdout"));
        let stderr = LineLog::capture(child.stderr.take().expect("piped stderr"));
        Probe {
            pid: child.id(),
            child,
            stdout,
            stderr,
            desc,
        }
    }

    /// Runs the probe to completion (deadline [`DEFAULT_TIMEOUT`]) and returns its outcome.
    #[track_caller]
    pub fn run(self) -> ProbeOutcome {
        self.spawn().finish(DEFAULT_TIMEOUT)
    }
}

/// The payload `raw-send` puts in its packet (the sender's pid makes it unique).
pub fn raw_payload(sender_pid: u32) -> String {
    format!("ztai-probe raw {sender_pid}")
}

/// Whether `line` is a `raw-recv` line for a packet of `proto` carrying `payload`.
pub fn is_raw_recv_line(line: &str, proto: u8, payload: &str) -> bool {
    let mut w = line.splitn(4, ' ');
    w.next() == Some("recv")
        && w.next() == Some(proto.to_string().as_str())
        && w.next().is_some()
        && w.next() == Some(payload)
}

/// A running probe. Killed (SIGKILL) and reaped on drop.
pub struct Probe {
    child: Child,
    pid: u32,
    stdout: LineLog,
    stderr: LineLog,
    desc: String,
}

impl Probe {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn description(&self) -> &str {
        &self.desc
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    /// Waits for a stdout line matching `pred`; panics on timeout or when the probe exits first.
    #[track_caller]
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        match self
            .stdout
            .wait_for(timeout, |lines| lines.iter().find(|l| pred(l)).cloned())
        {
            Ok(l) => l,
            Err(end) => panic!(
                "{}: no stdout line {what} ({}).\nstdout:\n{}\nstderr:\n{}",
                self.desc,
                match end {
                    WaitEnd::Closed => "probe exited".to_string(),
                    WaitEnd::TimedOut => format!("timed out after {timeout:?}"),
                },
                self.stdout.tail(20),
                self.stderr.tail(20)
            ),
        }
    }

    /// Waits for the server's `listening <addr>` line and returns the address.
    #[track_caller]
    pub fn wait_listening(&self) -> SocketAddr {
        let line = self.wait_line("\"listening ...\"", DEFAULT_TIMEOUT, |l| {
            l.starts_with("listening ")
        });
        let addr = line["listening ".len()..].trim();
        addr.parse()
            .unwrap_or_else(|e| panic!("{}: bad listening line {line:?}: {e}", self.desc))
    }

    /// Waits for the probe to exit by itself within `timeout`; on timeout kills it and panics.
    #[track_caller]
    pub fn finish(mut self, timeout: Duration) -> ProbeOutcome {
        let closed = self.stdout.wait_closed(timeout);
        let status = if closed {
            crate::util::wait_child(&mut self.child, timeout)
        } else {
            None
        };
        let Some(status) = status else {
            kill_and_reap(&mut self.child);
            panic!(
                "{} did not exit within {timeout:?}.\nstdout:\n{}\nstderr:\n{}",
                self.desc,
                self.stdout.tail(20),
                self.stderr.tail(20)
            );
        };
        self.stderr.wait_closed(Duration::from_secs(2));
        ProbeOutcome {
            pid: self.pid,
            code: status.code(),
            signal: status.signal(),
            stdout: self.stdout.snapshot(),
            stderr: self.stderr.snapshot(),
            desc: self.desc.clone(),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// How a finished probe ended.
#[derive(Debug, Clone)]
pub struct ProbeOutcome {
    pub pid: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
    pub desc: String,
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (pid {}) exited with {}; stdout: {:?}; stderr: {:?}",
            self.desc,
            self.pid,
            match (self.code, self.signal) {
                (Some(c), _) => format!("code {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "unknown status".into(),
            },
            self.stdout,
            self.stderr
        )
    }
}

impl ProbeOutcome {
    /// The final status line (`ok`, `err EPERM ...`).
    pub fn status(&self) -> &str {
        self.stdout.last().map(String::as_str).unwrap_or("")
    }

    /// The address of a `bound <addr>` line (printed when `--bind` was given).
    pub fn bound_addr(&self) -> Option<SocketAddr> {
        self.stdout
            .iter()
            .find_map(|l| l.strip_prefix("bound ")?.trim().parse().ok())
    }

    pub fn is_ok(&self) -> bool {
        self.code == Some(exit::OK) && self.status() == "ok"
    }

    /// The TCP handshake (or a read) did not complete within the probe's deadline.
    pub fn is_timeout(&self) -> bool {
        self.code == Some(exit::TIMEOUT) && self.status().starts_with("err ETIMEDOUT")
    }

    /// Bytes a `--send-bytes` upload wrote on the connection (header line included).
    pub fn sent_bytes(&self) -> Option<u64> {
        self.stdout.iter().find_map(|l| {
            l.strip_prefix("sent ")?
                .strip_suffix(" bytes")?
                .parse()
                .ok()
        })
    }

    pub fn is_eperm(&self) -> bool {
        self.code == Some(exit::EPERM) && self.status().starts_with("err EPERM")
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Self {
        assert!(self.is_ok(), "expected success (exit 0, `ok`), got: {self}");
        self
    }

    #[track_caller]
    pub fn assert_eperm(&self) -> &Self {
        assert!(
            self.is_eperm(),
            "expected EPERM (exit 3, `err EPERM ...`), got: {self}"
        );
        self
    }

    /// Asserts the client timed out (exit 7, `err ETIMEDOUT ...`): its packets were silently
    /// dropped — not refused (ECONNREFUSED) and not rejected locally (EPERM).
    #[track_caller]
    pub fn assert_timeout(&self) -> &Self {
        assert!(
            self.is_timeout(),
            "expected a timeout (exit 7, `err ETIMEDOUT ...`: the handshake never completed), got: {self}"
        );
        self
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code: {self}");
        self
    }
}
