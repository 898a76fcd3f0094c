//! Kernels to boot: Debian cloud kernel packages fetched with a private apt
//! configuration (the host's apt state is never touched) and unpacked under
//! `target/vm-cache/`, or the host's own image under /boot.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::{output, run_quiet};

/// A kernel the suite can be asked to run on: a Linux series (`5.10`, `6.1`,
/// `6.12` from Debian's releases; any other `X.Y` from trixie-backports, e.g.
/// `6.18`) or `host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice(String);

/// Series Debian releases ship as their cloud kernel (metapackage
/// linux-image-cloud-amd64), and what `all` means besides `host`.
const RELEASES: &[(&str, &str)] = &[
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
];

/// Where other series come from (old versions stay in its pool).
const BACKPORTS: &str = "trixie-backports";

impl Choice {
    pub fn host() -> Choice {
        Choice("host".into())
    }

    pub fn parse(s: &str) -> anyhow::Result<Vec<Choice>> {
        let s = s.trim();
        if s == "all" {
            let mut v: Vec<Choice> = RELEASES
                .iter()
                .map(|(l, _)| Choice(l.to_string()))
                .collect();
            v.push(Choice::host());
            return Ok(v);
        }
        if s == "host" {
            return Ok(vec![Choice::host()]);
        }
        let series_ok = s.split_once('.').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.chars().all(|c| c.is_ascii_digit())
                && b.chars().all(|c| c.is_ascii_digit())
        });
        if !series_ok {
            bail!(
                "unknown kernel {s:?}: use 5.10, 6.1, 6.12, host or all (or another series X.Y from Debian {BACKPORTS}, e.g. 6.18)"
            );
        }
        Ok(vec![Choice(s.to_string())])
    }

    pub fn label(&self) -> &str {
        &self.0
    }

    pub fn is_host(&self) -> bool {
        self.0 == "host"
    }
}

/// An unpacked kernel: its image and, when it has any, its module tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub label: String,
    /// `uname -r` inside the guest, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    pub image: PathBuf,
    /// `lib/modules/<release>` (may be missing for the host kernel).
    pub modules: Option<PathBuf>,
    /// Where it came from (package name and version, or the host path).
    pub origin: String,
}

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const MIRROR: &str = "http://deb.debian.org/debian";
const SECURITY_MIRROR: &str = "http://deb.debian.org/debian-security";

/// Downloads (first time) and unpacks the Debian cloud kernel for `choice`
/// under `cache/kernel-<label>/`. Later runs reuse it without network;
/// delete that folder to pick up a newer package.
pub fn debian_kernel(cache: &Path, choice: &Choice) -> anyhow::Result<Kernel> {
    let label = choice.label();
    let (suite, pick) = match RELEASES.iter().find(|(l, _)| *l == label) {
        Some((_, suite)) => (*suite, Pick::Metapackage),
        None => (BACKPORTS, Pick::Series(label.to_string())),
    };
    let dir = cache.join(format!("kernel-{label}"));
    let done = dir.join("package.txt");
    if !done.is_file() {
        fetch(cache, suite, &pick, &dir)
            .with_context(|| format!("cannot fetch the {label} kernel from Debian {suite}"))?;
    } else {
        eprintln!(
            "xtask vm-test: {label}: using the cached kernel in {} (delete it to refresh)",
            dir.display()
        );
    }
    let origin = fs::read_to_string(&done)?.trim().to_string();
    let root = dir.join("root");
    let boot = root.join("boot");
    let image = fs::read_dir(&boot)
        .with_context(|| format!("cannot list {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = image
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    if !release.starts_with(&format!("{label}.")) && !release.starts_with(&format!("{label}+")) {
        bail!(
            "the {suite} cloud kernel is {release}, not {label}.x: Debian moved on; update RELEASES in xtask/src/vm/kernels.rs"
        );
    }
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|m| root.join(m).join(&release))
        .find(|p| p.is_dir());
    Ok(Kernel {
        label: label.to_string(),
        release,
        image,
        modules,
        origin,
    })
}

/// Which kernel package of a suite.
enum Pick {
    /// What linux-image-cloud-amd64 depends on.
    Metapackage,
    /// The newest linux-image-<series>.N+...-cloud-amd64.
    Series(String),
}

/// "6.16.12+deb13" → [6, 16, 12, 13] for ordering.
fn version_key(v: &str) -> Vec<u64> {
    v.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

fn fetch(cache: &Path, suite: &str, pick: &Pick, dir: &Path) -> anyhow::Result<()> {
    if !Path::new(KEYRING).is_file() {
        bail!(
            "{KEYRING} is missing: it verifies the Debian archive (Debian/Ubuntu: apt-get install debian-archive-keyring)"
        );
    }
    let apt = cache.join("apt").join(suite);
    for d in [
        "state/lists/partial",
        "cache/archives/partial",
        "etc/apt.conf.d",
        "etc/preferences.d",
        "etc/sources.list.d",
        "download",
    ] {
        fs::create_dir_all(apt.join(d))?;
    }
    let sources = apt.join("etc/sources.list");
    let mut list = format!("deb [signed-by={KEYRING}] {MIRROR} {suite} main\n");
    if !suite.contains('-') {
        list.push_str(&format!(
            "deb [signed-by={KEYRING}] {SECURITY_MIRROR} {suite}-security main\n"
        ));
    }
    fs::write(&sources, list)?;
    fs::write(apt.join("state/status"), "")?;
    let opts: Vec<String> = [
        ("Dir::Etc::sourcelist", sources.clone()),
        ("Dir::Etc::sourceparts", apt.join("etc/sources.list.d")),
        ("Dir::Etc::preferences", apt.join("etc/preferences")),
        ("Dir::Etc::preferencesparts", apt.join("etc/preferences.d")),
        ("Dir::State", apt.join("state")),
        ("Dir::State::status", apt.join("state/status")),
        ("Dir::Cache", apt.join("cache")),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", v.display()))
    .chain(
        [
            "APT::Architecture=amd64",
            "APT::Architectures=amd64",
            "Debug::NoLocking=1",
            "APT::Sandbox::User=root",
            // CI downloads into a fresh clone each run: ride out a transient mirror error.
            "Acquire::Retries=3",
        ]
        .map(String::from),
    )
    .flat_map(|o| ["-o".to_string(), o])
    .collect();
    let apt_get = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(&opts).args(args);
        c
    };
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "apt-get is needed to download Debian kernels (this task expects a Debian-like host)"
        );
    }
    eprintln!(
        "xtask vm-test: apt-get update for Debian {suite} (private state in {})",
        apt.display()
    );
    run_quiet(&mut apt_get(&["-q", "update"]))?;
    let apt_cache = |args: &[&str]| -> anyhow::Result<String> {
        let mut c = Command::new("apt-cache");
        c.args(&opts).args(args);
        output(&mut c)
    };
    let package = match pick {
        Pick::Metapackage => {
            let deps = apt_cache(&["depends", "linux-image-cloud-amd64"])?;
            deps.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends:"))
                .map(str::trim)
                .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
                .with_context(|| format!("linux-image-cloud-amd64 in {suite} depends on no linux-image-*-cloud-amd64:\n{deps}"))?
                .to_string()
        }
        Pick::Series(series) => {
            let found = apt_cache(&[
                "search",
                "--names-only",
                &format!("^linux-image-{}[.+]", series.replace('.', "\\.")),
            ])?;
            found
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|p| p.ends_with("-cloud-amd64"))
                .filter(|p| {
                    let v = p.trim_start_matches("linux-image-");
                    v.strip_prefix(series.as_str()).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('+'))
                })
                .max_by_key(|p| version_key(p))
                .with_context(|| format!("Debian {suite} has no linux-image-{series}.*-cloud-amd64 (try another series)"))?
                .to_string()
        }
    };
    // Newer packaging splits the image: take its versioned modules/binary parts too.
    let deps = apt_cache(&["depends", &package])?;
    let mut packages = vec![package.clone()];
    for d in deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
    {
        if (d.starts_with("linux-modules-") || d.starts_with("linux-binary-"))
            && d.ends_with("-cloud-amd64")
            && !packages.iter().any(|p| p == d)
        {
            packages.push(d.to_string());
        }
    }
    let download = apt.join("download");
    for old in fs::read_dir(&download)?.flatten() {
        let _ = fs::remove_file(old.path());
    }
    eprintln!("xtask vm-test: apt-get download {}", packages.join(" "));
    let mut args = vec!["-q", "download"];
    args.extend(packages.iter().map(String::as_str));
    run_quiet(apt_get(&args).current_dir(&download))?;
    let debs: Vec<PathBuf> = fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    if debs.is_empty() {
        bail!("apt-get download left no .deb");
    }
    let _ = fs::remove_dir_all(dir);
    let staging = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    let mut version = String::new();
    for deb in &debs {
        run_quiet(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(staging.join("root")),
        )?;
        if deb
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        {
            version = output(
                Command::new("dpkg-deb")
                    .args(["-f"])
                    .arg(deb)
                    .arg("Version"),
            )
            .unwrap_or_default();
        }
    }
    fs::write(
        staging.join("package.txt"),
        format!("{package} {version} (Debian {suite})\n"),
    )?;
    fs::rename(&staging, dir)?;
    for deb in &debs {
        let _ = fs::remove_file(deb);
    }
    Ok(())
}

/// The running kernel, if its image can be read under /boot.
pub fn host_kernel() -> Result<Kernel, String> {
    let release =
        output(Command::new("uname").arg("-r")).map_err(|e| format!("cannot run uname -r: {e}"))?;
    let image = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    match fs::File::open(&image) {
        Ok(_) => {}
        Err(e) => {
            return Err(format!(
                "the running kernel's image {} is not readable ({e})",
                image.display()
            ));
        }
    }
    let modules = [
        format!("/lib/modules/{release}"),
        format!("/usr/lib/modules/{release}"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_dir());
    Ok(Kernel {
        label: "host".into(),
        origin: image.display().to_string(),
        release,
        image,
        modules,
    })
}

/// A kernel module ready for insmod: its name and uncompressed bytes.
pub struct Module {
    pub name: String,
    pub bytes: Vec<u8>,
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// `wanted` plus everything they depend on (from each module's `.modinfo`
/// `depends=`), dependencies first. Modules built into the kernel (listed in
/// `modules.builtin`) and ones the package does not have are skipped, with a
/// note in the returned list of remarks.
pub fn modules_with_deps(
    tree: &Path,
    wanted: &[&str],
) -> anyhow::Result<(Vec<Module>, Vec<String>)> {
    let mut index: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut stack = vec![tree.join("kernel")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(n) = p.file_name().map(|n| n.to_string_lossy().to_string())
                && let Some(base) = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s))
            {
                index.insert(norm(base), p);
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_to_string(tree.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|n| n.strip_suffix(".ko"))
        .map(norm)
        .collect();
    let mut out = Vec::new();
    let mut remarks = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        seen: &mut BTreeSet<String>,
        out: &mut Vec<Module>,
        remarks: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let name = norm(name);
        if !seen.insert(name.clone()) {
            return Ok(());
        }
        let Some(path) = index.get(&name) else {
            remarks.push(if builtin.contains(&name) {
                format!("{name}: built in")
            } else {
                format!("{name}: not in this kernel package")
            });
            return Ok(());
        };
        let bytes = read_module(path)?;
        for dep in modinfo_field(&bytes, "depends")
            .unwrap_or_default()
            .split(',')
            .filter(|d| !d.is_empty())
        {
            visit(dep, index, builtin, seen, out, remarks)?;
        }
        out.push(Module { name, bytes });
        Ok(())
    }
    for w in wanted {
        visit(w, &index, &builtin, &mut seen, &mut out, &mut remarks)?;
    }
    Ok((out, remarks))
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let n = path.to_string_lossy();
    let tool = if n.ends_with(".xz") {
        Some("xz")
    } else if n.ends_with(".zst") {
        Some("zstd")
    } else if n.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("cannot read {}", path.display())),
        Some(t) => {
            let out = Command::new(t)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| {
                    format!("cannot run {t} to unpack {} (install {t})", path.display())
                })?;
            if !out.status.success() {
                bail!(
                    "{t} -dc {} failed: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(out.stdout)
        }
    }
}

/// A `key=value` entry of an ELF module's `.modinfo` section.
pub fn modinfo_field(elf: &[u8], key: &str) -> Option<String> {
    let u16_at = |o: usize| {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    if elf.get(0..5) != Some(b"\x7fELF\x02") {
        return None;
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3A)?;
    let shnum = u16_at(0x3C)?;
    let shstrndx = u16_at(0x3E)?;
    let sh = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(sh(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let name_off = strtab + u32_at(sh(i))?;
        let name = elf.get(name_off..)?.split(|b| *b == 0).next()?;
        if name == b".modinfo" {
            let off = u64_at(sh(i) + 0x18)?;
            let size = u64_at(sh(i) + 0x20)?;
            let data = elf.get(off..off + size)?;
            let prefix = format!("{key}=");
            return data
                .split(|b| *b == 0)
                .find_map(|e| e.strip_prefix(prefix.as_bytes()))
                .map(|v| String::from_utf8_lossy(v).into_owned());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices() {
        let all: Vec<String> = Choice::parse("all")
            .unwrap()
            .iter()
            .map(|c| c.label().to_string())
            .collect();
        assert_eq!(all, ["5.10", "6.1", "6.12", "host"]);
        assert_eq!(Choice::parse("6.18").unwrap()[0].label(), "6.18");
        assert!(Choice::parse("host").unwrap()[0].is_host());
        assert!(Choice::parse("6").is_err());
        assert!(Choice::parse("latest").is_err());
        assert!(
            version_key("linux-image-6.16.12+deb13-cloud-amd64")
                > version_key("linux-image-6.16.3+deb13-cloud-amd64")
        );
    }

    #[test]
    fn modinfo_of_a_tiny_elf() {
        // ELF64 header + .modinfo + .shstrtab, built by hand.
        let modinfo = b"license=GPL\0depends=stp,llc\0name=bridge\0";
        let shstr = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        let mi_off = elf.len();
        elf.extend_from_slice(modinfo);
        let ss_off = elf.len();
        elf.extend_from_slice(shstr);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3A..0x3C].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3C..0x3E].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3E..0x40].copy_from_slice(&2u16.to_le_bytes());
        let mut sect = |name: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            s[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&s);
        };
        sect(0, 0, 0);
        sect(1, mi_off, modinfo.len());
        sect(10, ss_off, shstr.len());
        assert_eq!(modinfo_field(&elf, "depends").as_deref(), Some("stp,llc"));
        assert_eq!(modinfo_field(&elf, "name").as_deref(), Some("bridge"));
        assert_eq!(modinfo_field(&elf, "vermagic"), None);
    }
}
