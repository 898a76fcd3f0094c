//! Changes to the policy file as events. The parent directory is watched, not
//! the file: editors and config management replace files by writing a new one
//! and renaming it over the old, which a watch on the file itself would miss.
//! Any event in that folder counts: a Kubernetes ConfigMap volume updates by
//! swapping a `..data` symlink the file points through, never touching the
//! file's own name. The reload compares content, so unrelated events cost a read.
use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use inotify::{Inotify, WatchMask};

pub struct PolicyFileWatcher {
    inotify: Inotify,
}

impl PolicyFileWatcher {
    pub fn new(path: &Path) -> io::Result<Self> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        if path.file_name().is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "policy path has no file name"));
        }
        let inotify = Inotify::init()?;
        inotify
            .watches()
            .add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR)?;
        Ok(Self { inotify })
    }

    /// Reads pending events; true if there were any.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut touched = false;
        loop {
            match self.inotify.read_events(&mut buf) {
                Ok(events) => {
                    let mut any = false;
                    for _ in events {
                        any = true;
                        touched = true;
                    }
                    if !any {
                        return touched;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return touched,
                Err(_) => return true,
            }
        }
    }
}

impl AsRawFd for PolicyFileWatcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }
}
