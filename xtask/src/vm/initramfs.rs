//! The guest's root filesystem: a newc cpio archive (what the kernel unpacks
//! as initramfs), written directly so no `cpio` tool and no root-owned
//! staging tree are needed. Host programs are copied with the shared
//! libraries `ldd` names, at the same paths, so they run unchanged.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { src: Source, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// Files for the archive, keyed by their absolute path in the guest.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
    /// Where stripped copies of big binaries go.
    scratch: PathBuf,
}

fn clean(path: &str) -> String {
    let p = path.trim_start_matches('/');
    p.split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl Tree {
    pub fn new(scratch: &Path) -> anyhow::Result<Tree> {
        fs::create_dir_all(scratch)?;
        Ok(Tree {
            entries: BTreeMap::new(),
            scratch: scratch.to_path_buf(),
        })
    }

    pub fn contains(&self, guest: &str) -> bool {
        self.entries.contains_key(&clean(guest))
    }

    fn parents(&mut self, p: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = p.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert(Entry::Dir);
        }
    }

    pub fn dir(&mut self, guest: &str) {
        let p = clean(guest);
        self.parents(&p);
        self.entries.entry(p).or_insert(Entry::Dir);
    }

    pub fn bytes(&mut self, guest: &str, data: impl Into<Vec<u8>>, mode: u32) {
        let p = clean(guest);
        self.parents(&p);
        self.entries.insert(
            p,
            Entry::File {
                src: Source::Bytes(data.into()),
                mode,
            },
        );
    }

    /// `host` (symlinks followed) at `guest`, keeping the host file's mode.
    pub fn file(&mut self, guest: &str, host: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = fs::metadata(host).with_context(|| format!("cannot read {}", host.display()))?;
        let p = clean(guest);
        self.parents(&p);
        self.entries.insert(
            p,
            Entry::File {
                src: Source::Host(host.to_path_buf()),
                mode: meta.permissions().mode() & 0o7777,
            },
        );
        Ok(())
    }

    pub fn symlink(&mut self, guest: &str, target: &str) {
        let p = clean(guest);
        self.parents(&p);
        self.entries.insert(p, Entry::Symlink(target.to_string()));
    }

    pub fn char_dev(&mut self, guest: &str, major: u32, minor: u32) {
        let p = clean(guest);
        self.parents(&p);
        self.entries.insert(p, Entry::CharDev { major, minor });
    }

    /// An executable plus the shared libraries it needs (at the paths `ldd`
    /// reports), with debug info stripped when `strip` is set (smaller
    /// archive; panic messages are unaffected).
    pub fn program(&mut self, guest: &str, host: &Path, strip: bool) -> anyhow::Result<()> {
        let src = if strip {
            self.stripped(host)?
        } else {
            host.to_path_buf()
        };
        self.file(guest, &src)?;
        self.libraries_of(host)
    }

    pub fn libraries_of(&mut self, host: &Path) -> anyhow::Result<()> {
        for lib in ldd(host)? {
            if !self.contains(&lib.to_string_lossy()) {
                self.file(&lib.to_string_lossy(), &lib)?;
            }
        }
        Ok(())
    }

    fn stripped(&self, host: &Path) -> anyhow::Result<PathBuf> {
        let name = host.file_name().context("no file name")?;
        let out = self.scratch.join(name);
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(host)
            .status();
        match status {
            Ok(s) if s.success() => Ok(out),
            _ => {
                eprintln!(
                    "xtask vm-test: note: cannot strip {} (binutils' strip missing?); copying it whole",
                    host.display()
                );
                Ok(host.to_path_buf())
            }
        }
    }

    /// Copies the host folder `host` to `guest`, skipping entries for which
    /// `skip(relative path, is_dir)` is true. Symlinks inside are kept as
    /// symlinks. Returns the number of files.
    pub fn tree(
        &mut self,
        guest: &str,
        host: &Path,
        skip: &dyn Fn(&str, bool) -> bool,
    ) -> anyhow::Result<usize> {
        let mut n = 0;
        let mut stack = vec![(host.to_path_buf(), String::new())];
        self.dir(guest);
        while let Some((dir, rel)) = stack.pop() {
            for e in fs::read_dir(&dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .flatten()
            {
                let name = e.file_name().to_string_lossy().to_string();
                let r = if rel.is_empty() {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                };
                let ft = e.file_type()?;
                let g = format!("{}/{r}", guest.trim_end_matches('/'));
                if ft.is_symlink() {
                    if skip(&r, false) {
                        continue;
                    }
                    let t = fs::read_link(e.path())?;
                    self.symlink(&g, &t.to_string_lossy());
                } else if ft.is_dir() {
                    if skip(&r, true) {
                        continue;
                    }
                    self.dir(&g);
                    stack.push((e.path(), r));
                } else if ft.is_file() {
                    if skip(&r, false) {
                        continue;
                    }
                    self.file(&g, &e.path())?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Writes the archive; returns its size in bytes.
    pub fn write(&self, out: &Path) -> anyhow::Result<u64> {
        let tmp = out.with_extension("tmp");
        let f =
            fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut written: u64 = 0;
        let mut ino = 1u32;
        let mut put = |w: &mut BufWriter<fs::File>,
                       name: &str,
                       mode: u32,
                       rdev: (u32, u32),
                       data: &[u8]|
         -> anyhow::Result<()> {
            let namesize = name.len() + 1;
            let header = format!(
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
                0,
                0,
                1,
                0,
                data.len(),
                0,
                0,
                rdev.0,
                rdev.1,
                0
            );
            ino += 1;
            w.write_all(header.as_bytes())?;
            w.write_all(name.as_bytes())?;
            w.write_all(&[0])?;
            let pad = |n: usize| (4 - n % 4) % 4;
            w.write_all(&[0u8; 3][..pad(110 + namesize)])?;
            w.write_all(data)?;
            w.write_all(&[0u8; 3][..pad(data.len())])?;
            written += (110 + namesize + pad(110 + namesize) + data.len() + pad(data.len())) as u64;
            Ok(())
        };
        for (path, e) in &self.entries {
            match e {
                Entry::Dir => put(&mut w, path, 0o040755, (0, 0), &[])?,
                Entry::Symlink(t) => put(&mut w, path, 0o120777, (0, 0), t.as_bytes())?,
                Entry::CharDev { major, minor } => {
                    put(&mut w, path, 0o020600, (*major, *minor), &[])?
                }
                Entry::File { src, mode } => {
                    let data = match src {
                        Source::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
                        Source::Host(p) => std::borrow::Cow::Owned(
                            fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
                        ),
                    };
                    put(&mut w, path, 0o100000 | mode, (0, 0), &data)?
                }
            }
        }
        put(&mut w, "TRAILER!!!", 0, (0, 0), &[])?;
        w.flush()?;
        drop(w);
        fs::rename(&tmp, out)?;
        Ok(written)
    }
}

/// Shared libraries `ldd` lists for `bin` (none for a static binary).
pub fn ldd(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd (glibc's libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": statically linked.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("{} needs {line}", bin.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(" (").next().unwrap_or("").trim(),
            None => line.split(" (").next().unwrap_or("").trim(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Python found on the host, to be copied for the metrics tests.
#[derive(Debug, Clone)]
pub struct Python {
    /// The real interpreter binary (symlinks resolved).
    pub executable: PathBuf,
    /// Its standard library folder (holds lib-dynload on Debian and pyenv).
    pub stdlib: PathBuf,
    /// `prometheus_client` package folder.
    pub prometheus_client: PathBuf,
}

fn py(python: &str, code: &str) -> Option<String> {
    let out = Command::new(python)
        .args(["-I", "-c", code])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn py_env(python: &str, code: &str) -> Option<String> {
    let out = Command::new(python).args(["-c", code]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A python3 with `prometheus_client`, or why there is none. Prefers the
/// system interpreter (/usr/bin/python3: smallest standard library), then
/// `python3` on PATH; the package may come from either.
pub fn find_python() -> Result<Python, String> {
    const WHERE: &str = "import os, sys, sysconfig; print(os.path.realpath(sys.executable)); print(sysconfig.get_paths()['stdlib']); print('%d.%d' % sys.version_info[:2])";
    const PKG: &str = "import os, prometheus_client.openmetrics.parser as p, prometheus_client as c; print(os.path.dirname(c.__file__))";
    let candidates = ["/usr/bin/python3", "python3"];
    let mut interpreters = Vec::new();
    for c in candidates {
        if let Some(out) = py(c, WHERE) {
            let l: Vec<&str> = out.lines().collect();
            if l.len() == 3
                && !interpreters
                    .iter()
                    .any(|(e, _, _): &(PathBuf, PathBuf, String)| e == Path::new(l[0]))
            {
                interpreters.push((PathBuf::from(l[0]), PathBuf::from(l[1]), l[2].to_string()));
            }
        }
    }
    if interpreters.is_empty() {
        return Err("no python3 on this host (Debian: apt-get install python3)".into());
    }
    // The package: from any interpreter of the same major.minor (it is pure Python).
    let mut pkg = None;
    for c in candidates {
        if let (Some(dir), Some(ver)) = (
            py_env(c, PKG),
            py(c, "import sys; print('%d.%d' % sys.version_info[:2])"),
        ) {
            pkg = Some((PathBuf::from(dir), ver));
            break;
        }
    }
    let Some((pkg_dir, pkg_ver)) = pkg else {
        return Err("python3 has no prometheus_client on this host (cargo xtask setup installs it: python3 -m pip install prometheus-client)".into());
    };
    // An interpreter of the version the package was found for; else the first one.
    let (executable, stdlib, _) = interpreters
        .iter()
        .find(|(_, _, v)| *v == pkg_ver)
        .cloned()
        .unwrap_or_else(|| interpreters[0].clone());
    Ok(Python {
        executable,
        stdlib,
        prometheus_client: pkg_dir,
    })
}

/// Parts of the standard library no test needs.
fn python_skip(rel: &str, is_dir: bool) -> bool {
    const DIRS: &[&str] = &[
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "distutils",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "venv",
        "__phello__",
    ];
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if is_dir {
        return DIRS.contains(&name) || name.starts_with("config-");
    }
    // Optimised bytecode variants are never used without -O.
    name.contains(".opt-1.") || name.contains(".opt-2.") || name.ends_with(".exe")
}

/// Copies the interpreter, its stdlib (minus tests, GUI, packaging tools), the
/// libraries its extension modules need, and prometheus_client under
/// `/ztai/python` (the init puts it on PYTHONPATH). `python3` is on PATH.
pub fn add_python(t: &mut Tree, p: &Python) -> anyhow::Result<usize> {
    let exe = p.executable.to_string_lossy().to_string();
    t.program(&exe, &p.executable, false)?;
    if !t.contains("/usr/bin/python3") {
        t.symlink("/usr/bin/python3", &exe);
    }
    let stdlib = p.stdlib.to_string_lossy().to_string();
    let n = t.tree(&stdlib, &p.stdlib, &python_skip)?;
    // Extension modules' own libraries (libssl, libffi, ...).
    let mut stack = vec![p.stdlib.clone()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)?.flatten() {
            let path = e.path();
            let rel = path
                .strip_prefix(&p.stdlib)
                .unwrap_or(&path)
                .to_string_lossy()
                .to_string();
            let ft = e.file_type()?;
            if ft.is_dir() && !python_skip(&rel, true) {
                stack.push(path);
            } else if ft.is_file() && rel.ends_with(".so") {
                t.libraries_of(&path)?;
            }
        }
    }
    let m = t.tree(
        "/ztai/python/prometheus_client",
        &p.prometheus_client,
        &python_skip,
    )?;
    Ok(n + m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_layout() {
        let dir = std::env::temp_dir().join(format!("ztai-vm-cpio-{}", std::process::id()));
        let mut t = Tree::new(&dir).unwrap();
        t.bytes("/ztai/a.txt", "hello", 0o644);
        t.symlink("/bin/sh", "busybox");
        t.char_dev("/dev/console", 5, 1);
        let out = dir.join("t.cpio");
        let size = t.write(&out).unwrap();
        let data = fs::read(&out).unwrap();
        assert_eq!(data.len() as u64, size);
        assert_eq!(data.len() % 4, 0);
        let text = String::from_utf8_lossy(&data);
        for name in [
            "bin\0",
            "bin/sh\0",
            "dev/console\0",
            "ztai\0",
            "ztai/a.txt\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name:?} missing");
        }
        // Every header starts on a 4-byte boundary with the newc magic.
        let mut off = 0;
        let mut names = Vec::new();
        while off < data.len() {
            assert_eq!(&data[off..off + 6], b"070701");
            let field = |i: usize| {
                usize::from_str_radix(
                    std::str::from_utf8(&data[off + 6 + i * 8..off + 14 + i * 8]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let (filesize, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&data[off + 110..off + 110 + namesize - 1])
                .unwrap()
                .to_string();
            let mut next = off + 110 + namesize;
            next += (4 - next % 4) % 4;
            next += filesize;
            next += (4 - next % 4) % 4;
            if name == "ztai/a.txt" {
                assert_eq!(&data[next - 8..next - 3], b"hello");
            }
            names.push(name);
            off = next;
        }
        assert_eq!(names.last().map(String::as_str), Some("TRAILER!!!"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stdlib_filter() {
        assert!(python_skip("test", true));
        assert!(python_skip("config-3.11-x86_64-linux-gnu", true));
        assert!(python_skip("__pycache__/json.cpython-311.opt-1.pyc", false));
        assert!(!python_skip("__pycache__/json.cpython-311.pyc", false));
        assert!(!python_skip("json", true));
        assert!(!python_skip("lib-dynload", true));
    }
}
