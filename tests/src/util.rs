//! Small shared utilities: unique ids, deadline polling, a temp directory guard.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(1);

/// A number unique within this test process (combine it with the pid for host-wide names).
pub fn unique_n() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Polls `f` until it returns `Some`, or `timeout` passes (then `None`).
///
/// The poll interval starts at 1 ms and backs off to 50 ms; this is condition polling with a
/// deadline, not a fixed sleep.
pub fn try_wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Like [`try_wait_until`], but panics with "timed out after ..: waiting for <what>".
#[track_caller]
pub fn wait_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    match try_wait_until(timeout, f) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// A private temporary directory, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "ztai-tests-{label}-{}-{}",
            std::process::id(),
            unique_n()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Sends `sig` to `pid` (a process this test started or found in its own cgroup subtree).
pub(crate) fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // Never signal ourselves, process groups (<= 0) or init.
    if pid <= 1 || pid as u32 == std::process::id() {
        return;
    }
    // SAFETY: plain kill(2) on a positive pid.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether a process with this pid exists (possibly as a zombie).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills `child` with SIGKILL (if still running) and reaps it.
pub(crate) fn kill_and_reap(child: &mut std::process::Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Waits for `child` to exit within `timeout` (polling), returning its status.
pub(crate) fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    try_wait_until(timeout, || child.try_wait().ok().flatten())
}
