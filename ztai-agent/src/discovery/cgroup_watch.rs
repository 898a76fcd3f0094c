//! Cgroup creation and removal as events (inotify on every cgroup directory
//! under the attach point), so a new cgroup is labeled within milliseconds
//! instead of at the next rescan. The kernel already gives a cgroup created
//! under a labeled parent its parent's segment; this covers cgroups that
//! match a selector of their own.
use std::{
    fs,
    io,
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use inotify::{Inotify, WatchMask};

pub struct CgroupWatcher {
    inotify: Inotify,
}

fn mask() -> WatchMask {
    WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR | WatchMask::DONT_FOLLOW
}

impl CgroupWatcher {
    /// Watches `root` and every cgroup below it.
    pub fn new(root: &Path) -> io::Result<Self> {
        let mut w = Self { inotify: Inotify::init()? };
        w.watch_tree(root)?;
        Ok(w)
    }

    /// Directories may appear while we walk; a child created before its
    /// watch exists is found by this walk, one created after by its event.
    fn watch_tree(&mut self, root: &Path) -> io::Result<()> {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            match self.inotify.watches().add(&dir, mask()) {
                Ok(_) => {}
                // Removed while we walked.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if dir == root => return Err(e),
                Err(e) => {
                    log::warn!(cgroup = dir.display().to_string(), error = e.to_string(); "cannot watch cgroup; it is still found by the periodic rescan");
                    continue;
                }
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
            }
        }
        Ok(())
    }

    /// Reads pending events, watching new cgroups. Returns true if the cgroup
    /// tree changed (or events were lost) and labels must be refreshed.
    pub fn drain(&mut self, root: &Path) -> bool {
        let mut buf = [0u8; 4096];
        let mut changed = false;
        let mut rewalk = false;
        loop {
            let events = match self.inotify.read_events(&mut buf) {
                Ok(events) => events,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Unreadable queue: assume anything may have happened.
                Err(_) => return true,
            };
            let mut any = false;
            for event in events {
                any = true;
                changed = true;
                // A new directory needs its own watch; after an overflow
                // (events lost) every directory is rewatched.
                rewalk |= event.mask.contains(inotify::EventMask::Q_OVERFLOW)
                    || event.mask.contains(inotify::EventMask::CREATE);
            }
            if !any {
                break;
            }
        }
        if rewalk {
            // Events carry names, not paths: rewalk, adding a watch for every
            // new directory (adding an existing watch is harmless).
            let _ = self.watch_tree(root);
        }
        changed
    }
}

impl AsRawFd for CgroupWatcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }
}
