//! cgroup2 discovery and the per-test cgroup subtree guard.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use crate::util::{pid_alive, signal, try_wait_until, unique_n};

/// How long cleanup waits for killed processes to leave a subtree and for rmdir to succeed.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The mount point of the cgroup2 (unified) hierarchy: the agent's own lookup in
/// `/proc/self/mountinfo`, so tests and agent agree on it.
///
/// Panics when there is no cgroup2 mount (the tests cannot run without one).
pub fn cgroup2_mount() -> PathBuf {
    ztai_agent::discovery::cgroups::cgroup2_mount().unwrap_or_else(|e| panic!("{e}"))
}

/// A cgroup inside a test's subtree (does not own it; the [`TestCgroup`] removes everything).
#[derive(Debug, Clone)]
pub struct Cgroup {
    mount: PathBuf,
    rel: String,
}

impl Cgroup {
    /// Absolute path, e.g. `/sys/fs/cgroup/unified/ztai-t123-4/orch`.
    pub fn path(&self) -> PathBuf {
        self.mount.join(&self.rel)
    }

    /// Path relative to the cgroup2 mount without a leading '/', e.g. `ztai-t123-4/orch`.
    pub fn rel_path(&self) -> &str {
        &self.rel
    }

    /// The path as `/proc/<pid>/cgroup` shows it (`0::/ztai-t123-4/orch`), e.g. `/ztai-t123-4/orch`.
    pub fn proc_path(&self) -> String {
        format!("/{}", self.rel)
    }

    /// `<rel_path>/<pattern>`: a policy glob pointing into this cgroup.
    pub fn glob(&self, pattern: &str) -> String {
        format!("{}/{}", self.rel, pattern)
    }

    /// Creates (if needed) and returns the descendant `name`, which may be nested (`"a/b"`).
    #[track_caller]
    pub fn child(&self, name: &str) -> Cgroup {
        assert!(
            !name.is_empty()
                && !name.starts_with('/')
                && name
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != ".."),
            "bad child cgroup name {name:?}: must be a relative path without '.'/'..'"
        );
        let child = Cgroup {
            mount: self.mount.clone(),
            rel: format!("{}/{}", self.rel, name),
        };
        std::fs::create_dir_all(child.path())
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", child.path().display()));
        child
    }

    /// A handle on `<mount>/<rel>` that is not created on disk (for unit tests).
    #[cfg(test)]
    pub(crate) fn for_tests(rel: &str) -> Cgroup {
        Cgroup {
            mount: PathBuf::from("/nonexistent"),
            rel: rel.to_string(),
        }
    }

    /// Removes this cgroup now (it must have no processes and no children left); the
    /// [`TestCgroup`] removes whatever is left at the end of the test anyway.
    #[track_caller]
    pub fn remove(&self) {
        std::fs::remove_dir(self.path())
            .unwrap_or_else(|e| panic!("cannot remove cgroup {}: {e}", self.path().display()));
    }

    /// Pids listed in this cgroup's `cgroup.procs` (not its descendants').
    pub fn procs(&self) -> Vec<u32> {
        read_procs(&self.path())
    }

    /// The `populated` flag of `cgroup.events` (this cgroup or any descendant has processes).
    pub fn populated(&self) -> bool {
        std::fs::read_to_string(self.path().join("cgroup.events"))
            .map(|t| t.lines().any(|l| l.trim() == "populated 1"))
            .unwrap_or(false)
    }
}

/// Owns a cgroup subtree `ztai-t<pid>-<n>` directly under the cgroup2 mount.
///
/// On drop (also during a panic): SIGKILL every process listed in any `cgroup.procs` of the
/// subtree, poll until they are gone, then rmdir deepest-first. A cleanup failure panics (or,
/// when already panicking, is printed to stderr).
#[derive(Debug)]
pub struct TestCgroup {
    root: Cgroup,
}

impl TestCgroup {
    #[track_caller]
    #[allow(clippy::new_without_default)] // creates a real cgroup: not a "default" value
    pub fn new() -> TestCgroup {
        let mount = cgroup2_mount();
        sweep_stale_subtrees(&mount);
        let name = format!("ztai-t{}-{}", std::process::id(), unique_n());
        let path = mount.join(&name);
        assert_eq!(
            path.parent(),
            Some(mount.as_path()),
            "subtree must sit directly under the mount"
        );
        if path.exists() {
            // A leftover of an earlier process that had our pid: it is ours by name.
            remove_subtree(&path, CLEANUP_TIMEOUT)
                .unwrap_or_else(|e| panic!("cannot remove stale {}: {e}", path.display()));
        }
        std::fs::create_dir(&path).unwrap_or_else(|e| {
            panic!(
                "cannot create test cgroup {} (need root and a writable cgroup2): {e}",
                path.display()
            )
        });
        TestCgroup {
            root: Cgroup { mount, rel: name },
        }
    }

    /// The subtree root as a plain [`Cgroup`].
    pub fn cgroup(&self) -> &Cgroup {
        &self.root
    }
}

impl std::ops::Deref for TestCgroup {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        &self.root
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = remove_subtree(&self.root.path(), CLEANUP_TIMEOUT) {
            let msg = format!(
                "cleanup of test cgroup {} failed: {e}",
                self.root.path().display()
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

fn read_procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Every directory of the subtree at `root`, deepest first (root last).
fn dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, &mut out);
    }
    out
}

/// Kills every process in the subtree (by pid) and removes its directories deepest-first.
pub(crate) fn remove_subtree(root: &Path, timeout: Duration) -> Result<(), String> {
    let me = std::process::id();
    let mut last_problem = String::new();
    let done = try_wait_until(timeout, || {
        if !root.exists() {
            return Some(());
        }
        let dirs = dirs_deepest_first(root);
        let mut remaining = Vec::new();
        for d in &dirs {
            for pid in read_procs(d) {
                if pid == me {
                    last_problem = format!("the test process itself is in {}", d.display());
                    continue;
                }
                signal(pid, libc::SIGKILL);
                remaining.push((pid, d.clone()));
            }
        }
        if !remaining.is_empty() {
            last_problem = format!("processes still in the subtree: {remaining:?}");
            return None;
        }
        for d in &dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    last_problem = format!("rmdir {}: {e}", d.display());
                    return None;
                }
            }
        }
        (!root.exists()).then_some(())
    });
    match done {
        Some(()) => Ok(()),
        None => Err(format!("not removed within {timeout:?}: {last_problem}")),
    }
}

/// Once per process: remove `ztai-t<pid>-<n>` subtrees left behind by test processes that no
/// longer exist (e.g. killed by a CI timeout). Only names of this exact form are touched.
fn sweep_stale_subtrees(mount: &Path) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(mount) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = stale_owner_pid(&name, "ztai-t") else {
                continue;
            };
            if pid != std::process::id()
                && !pid_alive(pid)
                && let Err(err) = remove_subtree(&e.path(), CLEANUP_TIMEOUT)
            {
                eprintln!(
                    "warning: cannot sweep stale cgroup {}: {err}",
                    e.path().display()
                );
            }
        }
    });
}

/// For `<prefix><pid>-<n>`, the pid.
pub(crate) fn stale_owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_parse_only_our_pattern() {
        assert_eq!(stale_owner_pid("ztai-t123-4", "ztai-t"), Some(123));
        assert_eq!(stale_owner_pid("ztai-t123", "ztai-t"), None);
        assert_eq!(stale_owner_pid("system.slice", "ztai-t"), None);
        assert_eq!(stale_owner_pid("ztai-n9-1", "ztai-n"), Some(9));
    }
}
