//! Workload processes. The bench re-executes its own binary (`xtask bench`
//! with `ZTAI_BENCH_CHILD=<role>`): the child first moves itself into the
//! cgroup named by `ZTAI_BENCH_CGROUP`, then runs its role. Children talk to
//! the bench in lines (stdout: results, stdin: commands) and exit when their
//! stdin closes, so none outlives the bench.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use super::sys;

const ENV_ROLE: &str = "ZTAI_BENCH_CHILD";
const ENV_CGROUP: &str = "ZTAI_BENCH_CGROUP";
const ENV_ARGS: &str = "ZTAI_BENCH_ARGS";
const ENV_CPU: &str = "ZTAI_BENCH_CPU";
const SEP: char = '\u{1f}';

/// The role this process was started for, if it is a bench child.
pub fn role() -> Option<String> {
    std::env::var(ENV_ROLE).ok()
}

// ---------------------------------------------------------------- parent side

/// A child process with line-based stdout; killed and reaped on drop.
pub struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(Instant, String)>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Runs `role` (with `key=value` args) in `cgroup`. Workloads (roles
    /// whose cgroup is `client` or `server`) share one CPU, see [`workload_cpu`].
    pub fn role(role: &str, cgroup: &Path, args: &[String]) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe().context("cannot find the xtask binary")?;
        let mut cmd = Command::new(exe);
        cmd.arg("bench")
            .env(ENV_ROLE, role)
            .env(ENV_CGROUP, cgroup)
            .env(ENV_ARGS, join(args));
        if cgroup.ends_with("client") || cgroup.ends_with("server") {
            cmd.env(ENV_CPU, workload_cpu().to_string());
        }
        Proc::spawn(format!("{role} in {}", cgroup.display()), cmd)
    }

    /// Runs `argv` (e.g. iperf3) in `cgroup`: a child joins it, then execs.
    pub fn exec_in(cgroup: &Path, argv: &[String]) -> anyhow::Result<Proc> {
        Proc::role("exec", cgroup, argv).map(|mut p| {
            p.what = format!("{} in {}", argv.join(" "), cgroup.display());
            p
        })
    }

    fn spawn(what: String, mut cmd: Command) -> anyhow::Result<Proc> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let (tx, rx) = channel();
        let out = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                if s.len() < 16 * 1024 {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Proc {
            what,
            child,
            stdin,
            lines: rx,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{}: stdin closed", self.what))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("{}: cannot write to it", self.what))
    }

    /// The next stdout line and when it arrived.
    pub fn line(&mut self, timeout: Duration) -> anyhow::Result<(Instant, String)> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => bail!(
                "{}: no answer within {timeout:?}{}",
                self.what,
                self.stderr_note()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                std::thread::sleep(Duration::from_millis(20));
                bail!(
                    "{}: exited ({status:?}) without answering{}",
                    self.what,
                    self.stderr_note()
                )
            }
        }
    }

    /// The next line, which must start with `word`; returns the rest, split.
    pub fn expect(
        &mut self,
        word: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Instant, Vec<String>)> {
        let (t, line) = self.line(timeout)?;
        let mut parts = line.split_whitespace().map(str::to_string);
        if parts.next().as_deref() != Some(word) {
            bail!(
                "{}: expected `{word} …`, got {line:?}{}",
                self.what,
                self.stderr_note()
            );
        }
        Ok((t, parts.collect()))
    }

    /// Waits for the process to exit (killing it after `timeout`) and returns all of its stdout.
    pub fn output(mut self, timeout: Duration) -> anyhow::Result<String> {
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((_, l)) => {
                    out.push_str(&l);
                    out.push('\n');
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{}: did not finish within {timeout:?}{}",
                    self.what,
                    self.stderr_note()
                ),
            }
        }
        let status = self
            .child
            .wait()
            .with_context(|| format!("{}: wait", self.what))?;
        if !status.success() {
            bail!(
                "{} failed ({status}){}\n{out}",
                self.what,
                self.stderr_note()
            );
        }
        Ok(out)
    }

    fn stderr_note(&self) -> String {
        let s = self.stderr.lock().unwrap();
        if s.trim().is_empty() {
            String::new()
        } else {
            format!("; its stderr:\n{}", s.trim_end())
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The CPU the benchmarked client and server share: the last one. On a VM,
/// two processes handing a connection back and forth across CPUs pay the
/// hypervisor's idle/wake-up latency, which here varies about 5× between quiet
/// and busy periods of the host; on one CPU each connection costs CPU work,
/// which is what the comparisons are about.
pub fn workload_cpu() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() - 1)
        .unwrap_or(0)
}

fn join(args: &[String]) -> String {
    args.iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(&SEP.to_string())
}

/// Waits until something listens on 127.0.0.1:`port` (TCP) in this network namespace.
pub fn wait_tcp_listen(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    let any = format!("00000000:{port:04X} 00000000:0000 0A");
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let text = std::fs::read_to_string("/proc/thread-self/net/tcp").unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains(&needle) || l.contains(&any))
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}")
}

// ----------------------------------------------------------------- child side

/// Entry point of a bench child process.
pub fn child_main(role: &str) -> anyhow::Result<()> {
    if let Some(cpu) = std::env::var(ENV_CPU).ok().and_then(|c| c.parse().ok()) {
        sys::pin_to_cpu(cpu).context("cannot pin to a CPU")?;
    }
    if let Some(cg) = std::env::var_os(ENV_CGROUP) {
        let cg = PathBuf::from(cg);
        std::fs::write(cg.join("cgroup.procs"), "0\n")
            .with_context(|| format!("cannot join cgroup {}", cg.display()))?;
    }
    let args: Vec<String> = std::env::var(ENV_ARGS)
        .unwrap_or_default()
        .split(SEP)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let arg = |k: &str| -> anyhow::Result<u64> {
        args.iter()
            .find_map(|a| a.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .ok_or_else(|| anyhow!("missing argument {k}="))?
            .parse()
            .with_context(|| format!("bad argument {k}"))
    };
    let loopback = |port: u64| SocketAddr::from(([127, 0, 0, 1], port as u16));
    match role {
        "exec" => {
            let (prog, rest) = args
                .split_first()
                .ok_or_else(|| anyhow!("exec: no program"))?;
            let err = Command::new(prog)
                .args(rest)
                .env_remove(ENV_ROLE)
                .env_remove(ENV_CGROUP)
                .env_remove(ENV_ARGS)
                .env_remove(ENV_CPU)
                .exec();
            Err(anyhow!("cannot exec {prog}: {err}"))
        }
        "tcp-server" => tcp_server(loopback(arg("port")?)),
        "tcp-client" => tcp_client(
            loopback(arg("port")?),
            arg("n")?,
            arg("warm")?,
            arg("chunks").unwrap_or(1),
        ),
        "udp-server" => udp_server(loopback(arg("port")?)),
        "udp-client" => udp_client(
            loopback(arg("port")?),
            arg("n")?,
            arg("warm")?,
            arg("size")? as usize,
            arg("chunks").unwrap_or(1),
        ),
        "storm" => storm(
            loopback(arg("port")?),
            Duration::from_millis(arg("ms")?),
            arg("rate")?,
        ),
        "probe" => probe(loopback(arg("port")?)),
        "check" => check(loopback(arg("port")?)),
        "bulk-server" => bulk_server(loopback(arg("port")?)),
        "bulk-client" => bulk_client(loopback(arg("port")?), Duration::from_millis(arg("ms")?)),
        other => bail!("unknown bench child role {other:?}"),
    }
}

/// Exits this process when the bench closes our stdin (or dies).
fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Accepts and closes connections.
fn tcp_server(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    exit_when_stdin_closes();
    say("ready");
    loop {
        match listener.accept() {
            Ok((s, _)) => drop(s),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Times an operation loop in chunks (about `chunks` of them): a stall of the
/// shared machine spoils a chunk, not the whole run.
struct Chunked {
    size: u64,
    last: Instant,
    last_k: u64,
    per_op_ns: Vec<String>,
}

impl Chunked {
    fn new(n: u64, chunks: u64) -> Chunked {
        Chunked {
            size: (n / chunks.max(1)).max(1),
            last: Instant::now(),
            last_k: 0,
            per_op_ns: Vec::new(),
        }
    }

    /// After the `k`-th timed operation (1-based) of `n`.
    fn done(&mut self, k: u64, n: u64) {
        if k.is_multiple_of(self.size) || k == n {
            let now = Instant::now();
            let ops = k - self.last_k;
            if ops > 0 {
                let ns = (now - self.last).as_nanos() as f64 / ops as f64;
                self.per_op_ns.push(format!("{ns:.1}"));
            }
            self.last = now;
            self.last_k = k;
        }
    }

    fn list(&self) -> String {
        self.per_op_ns.join(",")
    }
}

/// One connection = connect, wait until the server has accepted and closed
/// (EOF), close with RST. A refused connect (RST to the SYN) is counted and
/// tried again, at most 5 times per connection. Prints
/// `ok <ns for n> <n> <refused> <ns per connection of each chunk,…>`.
fn tcp_client(addr: SocketAddr, n: u64, warm: u64, chunks: u64) -> anyhow::Result<()> {
    let mut buf = [0u8; 64];
    let mut start = Instant::now();
    let mut refused = 0u64;
    let mut timer = Chunked::new(n, chunks);
    for i in 0..warm + n {
        if i == warm {
            start = Instant::now();
            refused = 0;
            timer = Chunked::new(n, chunks);
        }
        let mut tries = 0;
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 5 => {
                    tries += 1;
                    refused += 1;
                }
                Err(e) => return Err(e).with_context(|| format!("connection {i} to {addr}")),
            }
        };
        let got = s
            .read(&mut buf)
            .with_context(|| format!("connection {i}: read"))?;
        if got != 0 {
            bail!("connection {i}: server sent data");
        }
        sys::set_linger_zero(&s);
        drop(s);
        if i >= warm {
            timer.done(i + 1 - warm, n);
        }
    }
    say(&format!(
        "ok {} {n} {refused} {}",
        start.elapsed().as_nanos(),
        timer.list()
    ));
    Ok(())
}

/// Counts datagrams; answers `count` on stdin with `count <n>`.
fn udp_server(addr: SocketAddr) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while sock.recv_from(&mut buf).is_ok() {
            c.fetch_add(1, Ordering::Relaxed);
        }
    });
    say("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "count" {
            say(&format!("count {}", count.load(Ordering::Relaxed)));
        }
    }
    Ok(())
}

/// Unconnected `sendto` per datagram (the sendmsg hook runs for each).
/// Prints `ok <ns for n> <n> <errors> <ns per datagram of each chunk,…>`.
fn udp_client(addr: SocketAddr, n: u64, warm: u64, size: usize, chunks: u64) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let buf = vec![0x5au8; size.max(1)];
    let mut errors = 0u64;
    let mut start = Instant::now();
    let mut timer = Chunked::new(n, chunks);
    for i in 0..warm + n {
        if i == warm {
            start = Instant::now();
            timer = Chunked::new(n, chunks);
        }
        if sock.send_to(&buf, addr).is_err() {
            errors += 1;
        }
        if i >= warm {
            timer.done(i + 1 - warm, n);
        }
    }
    say(&format!(
        "ok {} {n} {errors} {}",
        start.elapsed().as_nanos(),
        timer.list()
    ));
    Ok(())
}

/// Denied connects for `dur`, at most `rate` per second. Prints `ok <attempts> <denied> <ns>`.
fn storm(addr: SocketAddr, dur: Duration, rate: u64) -> anyhow::Result<()> {
    let start = Instant::now();
    let (attempts, denied) = sys::denied_connect_loop(addr.port(), dur, rate)?;
    say(&format!(
        "ok {attempts} {denied} {}",
        start.elapsed().as_nanos()
    ));
    Ok(())
}

/// On each `go` line: connect to `addr` every 200 µs until one is denied
/// (EPERM); prints `denied <ns since go>` or `timeout`.
fn probe(addr: SocketAddr) -> anyhow::Result<()> {
    say("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() != "go" {
            continue;
        }
        let start = Instant::now();
        let mut answer = "timeout".to_string();
        while start.elapsed() < Duration::from_secs(3) {
            match TcpStream::connect(addr) {
                Err(e) if e.raw_os_error() == Some(sys::EPERM) => {
                    answer = format!("denied {}", start.elapsed().as_nanos());
                    break;
                }
                Err(_) => {}
                Ok(s) => {
                    sys::set_linger_zero(&s);
                    drop(s);
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        say(&answer);
    }
    Ok(())
}

/// One connect: prints `allowed`, or `denied <errno>`.
fn check(addr: SocketAddr) -> anyhow::Result<()> {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(s) => {
            sys::set_linger_zero(&s);
            say("allowed");
        }
        Err(e) => say(&format!("denied {}", e.raw_os_error().unwrap_or(-1))),
    }
    Ok(())
}

/// Reads one connection to EOF. Prints `ok <bytes>`.
fn bulk_server(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
    exit_when_stdin_closes();
    say("ready");
    let (mut s, _) = listener.accept()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    say(&format!("ok {total}"));
    Ok(())
}

/// Writes 128 KiB buffers for `dur`. Prints `ok <bytes> <ns>`.
fn bulk_client(addr: SocketAddr, dur: Duration) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    let buf = vec![0x5au8; 128 * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed() < dur {
        s.write_all(&buf)?;
        total += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let ns = start.elapsed().as_nanos();
    let mut sink = [0u8; 16];
    let _ = s.read(&mut sink);
    say(&format!("ok {total} {ns}"));
    Ok(())
}
