//! The real servers and clients, from Debian's archive, installed if missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::sys;

const APT_TIMEOUT: Duration = Duration::from_secs(600);

/// Where the programs the demo runs live.
#[derive(Debug, Clone)]
pub struct Tools {
    pub python: PathBuf,
    pub curl: PathBuf,
    pub psql: PathBuf,
    pub pg_bin: PathBuf,
    pub pg_major: String,
    pub pgvector: bool,
    /// `redis-server`, or the binary Debian's redis-server package links it to.
    pub redis_server: PathBuf,
    pub redis_cli: PathBuf,
    pub nginx: PathBuf,
    /// What this run installed, for the report.
    pub installed: Vec<String>,
    pub notes: Vec<String>,
}

/// A program the demo needs and the package that ships it.
struct Need {
    path: &'static str,
    package: &'static str,
}

/// Debian paths and packages. `redis-tools` ships the Redis server binary as
/// well as redis-cli (the `redis-server` package adds only a symlink, config
/// and the system service, which would occupy 6379 itself on a systemd host);
/// `nginx` is the binary package on bookworm and later.
const NEEDS: &[Need] = &[
    Need { path: "/usr/bin/python3", package: "python3" },
    Need { path: "/usr/bin/curl", package: "curl" },
    Need { path: "/usr/bin/psql", package: "postgresql-client" },
    Need { path: "/usr/bin/redis-cli", package: "redis-tools" },
    Need { path: "/usr/bin/redis-check-rdb", package: "redis-tools" },
    Need { path: "/usr/sbin/nginx", package: "nginx" },
    Need { path: "/usr/bin/ip", package: "iproute2" },
];

/// The newest /usr/lib/postgresql/<major>/bin with a postgres and an initdb.
fn postgres_bin() -> Option<(String, PathBuf)> {
    let mut found: Vec<(u32, String, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().into_owned();
            let bin = e.path().join("bin");
            let n: u32 = major.parse().ok()?;
            (bin.join("postgres").is_file() && bin.join("initdb").is_file()).then_some((n, major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, m, b)| (m, b))
}

fn apt_install(packages: &[String], log: &mut impl FnMut(&str)) -> anyhow::Result<()> {
    let install = |log: &mut dyn FnMut(&str)| -> anyhow::Result<()> {
        log(&format!("apt-get install -y {}", packages.join(" ")));
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=120"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        sys::run_ok(&mut cmd, APT_TIMEOUT).map(|_| ())
    };
    if let Err(first) = install(log) {
        sys::check_interrupt()?;
        log(&format!("{first:#}"));
        log("apt-get update (a package was not found or is out of date)");
        sys::run_ok(Command::new("apt-get").args(["update", "-q", "-o", "DPkg::Lock::Timeout=120"]), APT_TIMEOUT)
            .context("apt-get update failed")?;
        install(log).with_context(|| format!("cannot install {} from the Debian archive", packages.join(" ")))?;
    }
    Ok(())
}

/// Whether apt knows a package (from the lists already on this host).
fn apt_knows(package: &str) -> bool {
    Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

pub fn ensure(log: &mut impl FnMut(&str)) -> anyhow::Result<Tools> {
    if !Path::new("/usr/bin/apt-get").exists() {
        let missing: Vec<_> = NEEDS.iter().filter(|n| !Path::new(n.path).exists()).map(|n| n.path).collect();
        if !missing.is_empty() || postgres_bin().is_none() {
            bail!(
                "the demo installs its servers from Debian's archive, but this host has no apt-get; missing: {}",
                if missing.is_empty() { "a PostgreSQL server".to_string() } else { missing.join(", ") }
            );
        }
    }
    let mut wanted: Vec<String> = Vec::new();
    for n in NEEDS {
        if !Path::new(n.path).exists() && !wanted.iter().any(|w| w == n.package) {
            wanted.push(n.package.to_string());
        }
    }
    if postgres_bin().is_none() {
        wanted.push("postgresql".to_string());
    }
    let mut installed = Vec::new();
    if !wanted.is_empty() {
        apt_install(&wanted, log)?;
        installed.extend(wanted.iter().cloned());
    }
    for n in NEEDS {
        if !Path::new(n.path).exists() {
            bail!("{} is still missing after installing {}", n.path, n.package);
        }
    }
    let (pg_major, pg_bin) = postgres_bin()
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL server under /usr/lib/postgresql/*/bin after installing postgresql"))?;

    // pgvector where the archive has it (not in bookworm's main archive).
    let mut notes = Vec::new();
    let vector_control = PathBuf::from(format!("/usr/share/postgresql/{pg_major}/extension/vector.control"));
    let pgvector_pkg = format!("postgresql-{pg_major}-pgvector");
    if !vector_control.exists() {
        if apt_knows(&pgvector_pkg) {
            apt_install(std::slice::from_ref(&pgvector_pkg), log)?;
            installed.push(pgvector_pkg.clone());
        } else {
            notes.push(format!(
                "pgvector: the configured archive has no {pgvector_pkg} (apt-cache show), so the retrieval store answers with plain SQL"
            ));
        }
    }
    let pgvector = vector_control.exists();

    let redis_server =
        ["/usr/bin/redis-server", "/usr/bin/redis-check-rdb"].iter().map(PathBuf::from).find(|p| p.exists()).expect("checked above");
    Ok(Tools {
        python: "/usr/bin/python3".into(),
        curl: "/usr/bin/curl".into(),
        psql: "/usr/bin/psql".into(),
        pg_bin,
        pg_major,
        pgvector,
        redis_server,
        redis_cli: "/usr/bin/redis-cli".into(),
        nginx: "/usr/sbin/nginx".into(),
        installed,
        notes,
    })
}

/// uid and gid of a system user, from /etc/passwd.
pub fn user_ids(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("cannot read /etc/passwd")?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?))).flatten()
        })
        .ok_or_else(|| anyhow::anyhow!("there is no `{name}` user (the postgresql package creates it)"))
}
