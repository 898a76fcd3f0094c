//! The few system calls the demo needs that std does not offer (xtask depends on
//! std, anyhow and clap only), the Ctrl-C flag, and child processes that are
//! placed in a cgroup before they run and are stopped by pid when dropped.

use std::ffi::{CString, c_char, c_int, c_ulong, c_void};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

pub const SIGHUP: c_int = 1;
pub const SIGINT: c_int = 2;
pub const SIGKILL: c_int = 9;
pub const SIGTERM: c_int = 15;
const O_WRONLY: c_int = 0o1;
const O_CLOEXEC: c_int = 0o2000000;
const LOCK_EX: c_int = 2;
const LOCK_NB: c_int = 4;
const PR_SET_PDEATHSIG: c_int = 1;

unsafe extern "C" {
    fn kill(pid: i32, sig: c_int) -> c_int;
    fn signal(sig: c_int, handler: usize) -> usize;
    fn flock(fd: c_int, op: c_int) -> c_int;
    fn isatty(fd: c_int) -> c_int;
    fn open(path: *const c_char, flags: c_int, ...) -> c_int;
    fn write(fd: c_int, buf: *const c_void, n: usize) -> isize;
    fn close(fd: c_int) -> c_int;
    fn setgroups(n: usize, groups: *const u32) -> c_int;
    fn setgid(gid: u32) -> c_int;
    fn setuid(uid: u32) -> c_int;
    fn prctl(option: c_int, ...) -> c_int;
    fn setxattr(path: *const c_char, name: *const c_char, value: *const c_void, size: usize, flags: c_int) -> c_int;
    fn getxattr(path: *const c_char, name: *const c_char, value: *mut c_void, size: usize) -> isize;
}

pub use crate::host::is_root;

pub fn stdin_is_tty() -> bool {
    // SAFETY: no preconditions.
    unsafe { isatty(0) == 1 }
}

// ---------------------------------------------------------------- Ctrl-C ---

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP only set a flag: every wait of the demo polls it
/// and unwinds through the RAII guards, so teardown always runs. The demo's
/// children run in their own process groups, so a terminal's Ctrl-C reaches
/// the demo only, never a service or the agent behind the demo's back.
pub fn install_signal_handlers() {
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { signal(sig, on_signal as extern "C" fn(c_int) as usize) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once Ctrl-C (or SIGTERM/SIGHUP) arrived.
pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps up to `d`, returning early (with an error) on Ctrl-C.
pub fn sleep(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupt()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Polls `f` (1 ms backing off to 50 ms) until it yields, the deadline passes
/// ("timed out after …: waiting for WHAT") or Ctrl-C arrives.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> anyhow::Result<Option<T>>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        check_interrupt()?;
        if let Some(v) = f()? {
            return Ok(v);
        }
        let now = Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// For cleanup (ignores Ctrl-C): polls `f` until true or the timeout; whether it got there.
pub fn wait_for_quiet(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------- processes ---

/// Sends `sig` to `pid` (never to a group, init or ourselves).
pub fn send_signal(pid: u32, sig: c_int) {
    let Ok(p) = i32::try_from(pid) else { return };
    if p <= 1 || pid == std::process::id() {
        return;
    }
    // SAFETY: kill(2) on one positive pid.
    unsafe { kill(p, sig) };
}

/// Field 22 of /proc/PID/stat (start time in clock ticks): with the pid, it
/// names one process, so a reused pid is never mistaken for ours.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Every process the demo started, as (pid, start time, name), for the final
/// leftover check.
static STARTED: Mutex<Vec<(u32, u64, String)>> = Mutex::new(Vec::new());

pub fn started_processes() -> Vec<(u32, u64, String)> {
    STARTED.lock().map(|v| v.clone()).unwrap_or_default()
}

/// Whether a started process still exists (zombies of reaped children do not).
pub fn still_running(pid: u32, start: u64) -> bool {
    start_time(pid) == Some(start)
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
            == Some(false)
}

/// Where a child goes before it runs: a cgroup (its `cgroup.procs`), an
/// optional uid/gid to run as, and the signal it gets if the demo dies.
pub struct Placement {
    procs: CString,
    ids: Option<(u32, u32)>,
    death_signal: c_int,
}

impl Placement {
    pub fn cgroup(dir: &Path) -> Placement {
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).expect("cgroup path has no NUL");
        Placement { procs, ids: None, death_signal: SIGKILL }
    }

    pub fn run_as(mut self, uid: u32, gid: u32) -> Placement {
        self.ids = Some((uid, gid));
        self
    }

    /// The agent gets SIGTERM (so --detach-on-exit removes its pins) rather than SIGKILL.
    pub fn death_signal(mut self, sig: c_int) -> Placement {
        self.death_signal = sig;
        self
    }

    /// Runs in the forked child before exec: only raw system calls, no allocation.
    fn enter(&self) -> io::Result<()> {
        // SAFETY: plain system calls on a NUL-terminated path and a static buffer.
        unsafe {
            // Writing "0" to cgroup.procs moves the writing process itself,
            // before it has opened a single socket.
            let fd = open(self.procs.as_ptr(), O_WRONLY | O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            close(fd);
            if n != 1 {
                return Err(err);
            }
            if let Some((uid, gid)) = self.ids
                && (setgroups(0, std::ptr::null()) != 0 || setgid(gid) != 0 || setuid(uid) != 0)
            {
                return Err(io::Error::last_os_error());
            }
            // After setuid (which clears it): die with the demo. (The signal
            // comes when the spawning thread exits: the demo spawns from its
            // main thread only.)
            if prctl(PR_SET_PDEATHSIG, self.death_signal as c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Configures `cmd` to enter `placement` and its own process group.
pub fn place(cmd: &mut Command, placement: Placement) {
    cmd.process_group(0);
    // SAFETY: `Placement::enter` only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || placement.enter());
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| {
            let a = a.to_string_lossy();
            if a.contains(' ') || a.is_empty() { format!("'{a}'") } else { a.into_owned() }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A started child: stopped (signal, grace period, SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    stop_signal: c_int,
    grace: Duration,
    log: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` (already [`place`]d) and records it for the leftover check.
    pub fn spawn(name: &str, cmd: &mut Command, log: Option<&Path>) -> anyhow::Result<Proc> {
        if let Some(log) = log {
            let f = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("cannot start {name}: {}", describe(cmd)))?;
        let pid = child.id();
        if let (Some(t), Ok(mut v)) = (start_time(pid), STARTED.lock()) {
            v.push((pid, t, name.to_string()));
        }
        Ok(Proc {
            name: name.to_string(),
            child,
            stop_signal: SIGTERM,
            grace: Duration::from_secs(5),
            log: log.map(Path::to_path_buf),
            status: None,
        })
    }

    pub fn stop_with(mut self, sig: c_int) -> Proc {
        self.stop_signal = sig;
        self
    }

    pub fn grace(mut self, d: Duration) -> Proc {
        self.grace = d;
        self
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// The last `n` lines of its log file.
    pub fn log_tail(&self, n: usize) -> String {
        let Some(log) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Fails with the log tail if the process has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.exited() {
            bail!("{} exited ({status}); its output:\n{}", self.name, indent(&self.log_tail(25)));
        }
        Ok(())
    }

    /// Signal, wait up to the grace period, then SIGKILL; always reaped.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.exited().is_none() {
            send_signal(self.pid(), self.stop_signal);
            let end = Instant::now() + self.grace;
            while Instant::now() < end && self.exited().is_none() {
                std::thread::sleep(Duration::from_millis(10));
            }
            if self.exited().is_none() {
                let _ = self.child.kill();
                self.status = self.child.wait().ok();
            }
        }
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a short command to completion (with a deadline), returning (status,
/// stdout, stderr). Ctrl-C stops it.
pub fn run_capture(cmd: &mut Command, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
    run_capture_inner(cmd, timeout, true)
}

/// Like [`run_capture`], for teardown: Ctrl-C does not stop it.
pub fn run_capture_cleanup(cmd: &mut Command, timeout: Duration) -> anyhow::Result<(ExitStatus, String, String)> {
    run_capture_inner(cmd, timeout, false)
}

fn run_capture_inner(cmd: &mut Command, timeout: Duration, interruptible: bool) -> anyhow::Result<(ExitStatus, String, String)> {
    let what = describe(cmd);
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("cannot run {what}"))?;
    let out = read_all(child.stdout.take().expect("piped"));
    let err = read_all(child.stderr.take().expect("piped"));
    let end = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= end || interruptible && interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            if interruptible {
                check_interrupt()?;
            }
            bail!("{what} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (stdout, stderr) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    Ok((status, String::from_utf8_lossy(&stdout).into_owned(), String::from_utf8_lossy(&stderr).into_owned()))
}

/// Reads a pipe to its end on a thread.
pub fn read_all(mut r: impl io::Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        s
    })
}

/// Runs a command that must succeed; its stderr goes into the error.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> anyhow::Result<String> {
    let what = describe(cmd);
    let (status, out, err) = run_capture(cmd, timeout)?;
    if !status.success() {
        bail!("`{what}` failed ({status}): {}", err.trim());
    }
    Ok(out)
}

pub fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

// ------------------------------------------------------- locks and xattrs ---

/// A host-wide exclusive lock (flock), released when dropped or when the process dies.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn try_acquire(path: &Path) -> anyhow::Result<Option<FileLock>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe { flock(file.as_raw_fd(), LOCK_EX | LOCK_NB) };
        Ok((rc == 0).then_some(FileLock { _file: file }))
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path has no NUL")
}

/// Sets an extended attribute (used to mark cgroups the demo made).
pub fn set_xattr(path: &Path, name: &str, value: &str) -> io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).expect("no NUL"));
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let rc = unsafe { setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

pub fn get_xattr(path: &Path, name: &str) -> Option<String> {
    let (p, n) = (cpath(path), CString::new(name).expect("no NUL"));
    let mut buf = [0u8; 256];
    // SAFETY: valid strings; the kernel writes at most buf.len() bytes.
    let len = unsafe { getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| String::from_utf8_lossy(&buf[..len as usize]).into_owned())
}
