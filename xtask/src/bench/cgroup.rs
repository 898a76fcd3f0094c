//! The bench's own cgroup subtree `ztai-bench-<pid>` directly under the
//! cgroup2 mount. Everything the bench creates lives in it; dropping the guard
//! kills what is left inside and removes every directory, deepest first.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::sys;

const PREFIX: &str = "ztai-bench-";
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

pub use crate::host::cgroup2_mount;

pub struct BenchCgroup {
    mount: PathBuf,
    name: String,
}

impl BenchCgroup {
    pub fn create() -> anyhow::Result<BenchCgroup> {
        let mount = cgroup2_mount()?;
        sweep_stale(&mount);
        let name = format!("{PREFIX}{}", std::process::id());
        let path = mount.join(&name);
        if path.exists() {
            remove_subtree(&path).map_err(anyhow::Error::msg)?;
        }
        std::fs::create_dir(&path)
            .with_context(|| format!("cannot create cgroup {}", path.display()))?;
        Ok(BenchCgroup { mount, name })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Absolute path of the subtree root (never the cgroup2 root itself).
    pub fn path(&self) -> PathBuf {
        self.mount.join(&self.name)
    }

    /// Path relative to the mount, as policy globs and nftables write it.
    pub fn rel(&self) -> &str {
        &self.name
    }

    /// Creates `<root>/<name>` if missing and returns its absolute path.
    pub fn child(&self, name: &str) -> anyhow::Result<PathBuf> {
        assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..");
        let p = self.path().join(name);
        match std::fs::create_dir(&p) {
            Ok(()) => Ok(p),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(p),
            Err(e) => Err(e).with_context(|| format!("cannot create cgroup {}", p.display())),
        }
    }

    /// Removes the child cgroup `name` (it must hold no process).
    pub fn remove_child(&self, name: &str) -> anyhow::Result<()> {
        let p = self.path().join(name);
        std::fs::remove_dir(&p).with_context(|| format!("cannot remove cgroup {}", p.display()))
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_subtree(&self.path()) {
            eprintln!(
                "xtask bench: cleanup of cgroup {} failed: {e}",
                self.path().display()
            );
        }
    }
}

/// Moves process `pid` into the cgroup directory `cgroup`.
pub fn move_pid(cgroup: &Path, pid: u32) -> anyhow::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), format!("{pid}\n"))
        .with_context(|| format!("cannot move pid {pid} into {}", cgroup.display()))
}

fn read_procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn dirs_deepest_first(root: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                dirs_deepest_first(&e.path(), out);
            }
        }
    }
    out.push(root.to_path_buf());
}

/// SIGKILLs every process in the subtree, waits for them to go, removes the
/// directories deepest first. Bounded by [`CLEANUP_TIMEOUT`].
fn remove_subtree(root: &Path) -> Result<(), String> {
    let me = std::process::id();
    let deadline = Instant::now() + CLEANUP_TIMEOUT;
    let mut problem = String::new();
    while Instant::now() < deadline {
        if !root.exists() {
            return Ok(());
        }
        let mut dirs = Vec::new();
        dirs_deepest_first(root, &mut dirs);
        let mut busy = false;
        for d in &dirs {
            for pid in read_procs(d) {
                if pid != me {
                    let _ = sys::signal_pid(pid, sys::SIGKILL);
                }
                busy = true;
                problem = format!("pid {pid} still in {}", d.display());
            }
        }
        if !busy {
            let mut ok = true;
            for d in &dirs {
                if let Err(e) = std::fs::remove_dir(d)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    problem = format!("rmdir {}: {e}", d.display());
                    ok = false;
                    break;
                }
            }
            if ok && !root.exists() {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("not removed within {CLEANUP_TIMEOUT:?}: {problem}"))
}

/// Removes `ztai-bench-<pid>` subtrees whose bench process no longer exists
/// (e.g. a run killed with SIGKILL). Only that exact name form is touched.
fn sweep_stale(mount: &Path) {
    let Ok(entries) = std::fs::read_dir(mount) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !sys::pid_alive(pid) {
            eprintln!("xtask bench: removing stale cgroup {}", e.path().display());
            if let Err(err) = remove_subtree(&e.path()) {
                eprintln!(
                    "xtask bench: cannot remove stale cgroup {}: {err}",
                    e.path().display()
                );
            }
        }
    }
}
