//! Loading and removing the bench's nftables table (in the bench's own
//! network namespace, so the host's rules are never touched).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

use super::policy::NFT_TABLE;

/// The loaded table; deleted on drop.
pub struct NftTable(());

impl NftTable {
    /// `nft -f file`. nftables resolves `socket cgroupv2` paths under
    /// /sys/fs/cgroup only; when the cgroup2 mount is elsewhere (hybrid
    /// layouts) the load runs in a private mount namespace where the mount is
    /// bound there. The kernel keeps numeric cgroup ids.
    pub fn load(file: &Path, cgroup_mount: &Path) -> anyhow::Result<NftTable> {
        let _ = delete();
        let out = if cgroup_mount == Path::new("/sys/fs/cgroup") {
            Command::new("nft").arg("-f").arg(file).output()
        } else {
            Command::new("unshare")
                .args([
                    "-m",
                    "--propagation",
                    "private",
                    "--",
                    "sh",
                    "-c",
                    r#"mount --bind "$0" /sys/fs/cgroup && exec nft -f "$1""#,
                ])
                .arg(cgroup_mount)
                .arg(file)
                .output()
        }
        .context("cannot run nft")?;
        if !out.status.success() {
            let _ = delete();
            bail!(
                "nft -f {} failed ({}): {}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Connections the loops close leave conntrack entries in CLOSE state
        // (10 s by default); keep the table of this private namespace small.
        let _ = std::fs::write(
            "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close",
            "1",
        );
        Ok(NftTable(()))
    }
}

fn delete() -> anyhow::Result<()> {
    let out = Command::new("nft")
        .args(["delete", "table", "inet", NFT_TABLE])
        .output()?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = delete() {
            eprintln!("xtask bench: cannot delete nftables table inet {NFT_TABLE}: {e:#}");
        }
    }
}
