//! Changes to the policy file as events. The parent directory is watched, not
//! the file: editors and config management replace files by writing a new one
//! and renaming it over the old, which a watch on the file itself would miss.
use std::{
    ffi::OsString,
    io,
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use inotify::{Inotify, WatchMask};

pub struct PolicyFileWatcher {
    inotify: Inotify,
    name: OsString,
}

impl PolicyFileWatcher {
    pub fn new(path: &Path) -> io::Result<Self> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "policy path has no file name"))?
            .to_os_string();
        let inotify = Inotify::init()?;
        inotify
            .watches()
            .add(&dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::ONLYDIR)?;
        Ok(Self { inotify, name })
    }

    /// Reads pending events; true if one concerns the policy file.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let mut touched = false;
        loop {
            match self.inotify.read_events(&mut buf) {
                Ok(events) => {
                    let mut any = false;
                    for e in events {
                        any = true;
                        touched |= e.name.is_some_and(|n| n == self.name.as_os_str())
                            || e.mask.contains(inotify::EventMask::Q_OVERFLOW);
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
