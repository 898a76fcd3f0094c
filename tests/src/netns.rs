//! Network namespaces joined to the host by veth pairs: a "remote host" for cidr segments.
//!
//! Addressing (only TEST-NET ranges reserved for this suite):
//! slot `k` (1..=254, allocated host-wide with an flock so parallel test processes never share
//! one) uses
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | "enterprise" subnet on the link | 198.18.k.0/24 | fd5a:7a1e:0:k::/64 |
//! | host end `zt<k>h` | 198.18.k.1 | fd5a:7a1e:0:k::1 |
//! | remote end `zt<k>n` | 198.18.k.2 and .3 | fd5a:7a1e:0:k::2 and ::3 |
//! | "world" subnet on the same link | 198.19.k.0/24 | fd5a:7a1e:0:8k::/64 (0x8000+k) |
//! | host end / remote end | 198.19.k.1 / .2 | ::1 / ::2 |
//!
//! (fd5a:7a1e::/48 fixes the third group to 0, so the slot goes into the fourth group.)

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;
use std::time::Duration;

use crate::cgroup::stale_owner_pid;
use crate::util::{pid_alive, try_wait_until, unique_n, wait_until};

pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `ip ARGS`, returning its output.
fn ip_raw(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2 must be installed): {e}"))
}

/// Runs `ip ARGS` and panics (with stderr) when it fails.
#[track_caller]
pub fn ip(args: &[&str]) -> String {
    let out = ip_raw(args);
    assert!(
        out.status.success(),
        "`ip {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn netns_names() -> Vec<String> {
    // `ip netns list` prints "name" or "name (id: N)".
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Whether a network namespace with this name is registered (`ip netns list`).
pub fn netns_exists(name: &str) -> bool {
    netns_names().iter().any(|n| n == name)
}

/// Whether a link with this name exists in the host (test process's) namespace.
pub fn host_link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A named network namespace `ztai-n<pid>-<n>`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    #[track_caller]
    #[allow(clippy::new_without_default)] // creates a real namespace
    pub fn new() -> Netns {
        sweep_stale_netns();
        let name = format!("ztai-n{}-{}", std::process::id(), unique_n());
        if netns_exists(&name) {
            let _ = ip_raw(&["netns", "del", &name]);
        }
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>` (bind mount of the namespace, usable with setns(2)).
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// An open fd on the namespace, for setns(2).
    pub fn open(&self) -> File {
        File::open(self.path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.path().display()))
    }

    /// Runs `ip -n <name> ARGS` (panics on failure).
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command running `program` inside the namespace via `ip netns exec <name> program`.
    pub fn exec_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = ip_raw(&["netns", "del", &self.name]);
        if !out.status.success() && netns_exists(&self.name) {
            let msg = format!(
                "cannot delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// A veth pair `zt<k>h` (host namespace) / `zt<k>n` (inside a [`Netns`]); deleted on drop.
#[derive(Debug)]
pub struct Veth {
    host: String,
    peer: String,
}

impl Veth {
    /// Creates `zt<k>h` in the host namespace and `zt<k>n` directly inside `ns`, both up.
    #[track_caller]
    pub fn new(k: u32, ns: &Netns) -> Veth {
        let host = format!("zt{k}h");
        let peer = format!("zt{k}n");
        assert!(
            host.len() <= 15 && peer.len() <= 15,
            "interface names must be <= 15 chars"
        );
        ip(&[
            "link",
            "add",
            &host,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            ns.name(),
        ]);
        let v = Veth { host, peer };
        ip(&["link", "set", &v.host, "up"]);
        ns.ip(&["link", "set", &v.peer, "up"]);
        v
    }

    pub fn host_name(&self) -> &str {
        &self.host
    }

    pub fn peer_name(&self) -> &str {
        &self.peer
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair. It may already be gone with its namespace.
        if host_link_exists(&self.host) {
            let out = ip_raw(&["link", "del", &self.host]);
            if !out.status.success() && host_link_exists(&self.host) {
                let msg = format!(
                    "cannot delete veth {}: {}",
                    self.host,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                if std::thread::panicking() {
                    eprintln!("{msg}");
                } else {
                    panic!("{msg}");
                }
            }
        }
    }
}

/// A host-wide lock on one address/interface slot, released on drop (or when the process dies).
#[derive(Debug)]
pub(crate) struct SlotLock {
    pub(crate) k: u32,
    _file: File,
}

impl SlotLock {
    pub(crate) fn acquire() -> SlotLock {
        let dir = std::env::temp_dir().join("ztai-tests-slots");
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let start = (std::process::id()
            .wrapping_mul(7)
            .wrapping_add(unique_n() * 13))
            % 254;
        for i in 0..254 {
            let k = (start + i) % 254 + 1;
            let path = dir.join(format!("slot-{k}.lock"));
            let Ok(file) = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            // We own slot k now: anything named zt<k>h is a leftover of a dead test process.
            let stale = format!("zt{k}h");
            if host_link_exists(&stale) {
                let _ = ip_raw(&["link", "del", &stale]);
            }
            // Skip the slot if something else on the host uses its subnets.
            let in_use = [
                format!("198.18.{k}.0/24"),
                format!("198.19.{k}.0/24"),
                format!("fd5a:7a1e:0:{k:x}::/64"),
                format!("fd5a:7a1e:0:{:x}::/64", 0x8000 + k),
            ]
            .iter()
            .any(|net| !ip(&["-o", "addr", "show", "to", net]).trim().is_empty());
            if in_use {
                continue;
            }
            return SlotLock { k, _file: file };
        }
        panic!("no free remote-host slot in 1..=254 (all locked or in use)");
    }
}

/// A "remote host": a netns reached from the host through a veth pair, with addresses in an
/// "enterprise" subnet (198.18.k.0/24, fd5a:7a1e:0:k::/64) and a "world" subnet
/// (198.19.k.0/24, fd5a:7a1e:0:8xxx::/64). See the module docs for the layout.
///
/// Drops the veth, then the netns, then releases the slot. Start probes inside it after
/// creating it, so they are dropped (killed) first.
#[derive(Debug)]
pub struct RemoteHost {
    veth: Veth,
    ns: Netns,
    slot: SlotLock,
}

impl RemoteHost {
    #[track_caller]
    #[allow(clippy::new_without_default)] // creates a real namespace and veth pair
    pub fn new() -> RemoteHost {
        let slot = SlotLock::acquire();
        let k = slot.k;
        let ns = Netns::new();
        let veth = Veth::new(k, &ns);
        let rh = RemoteHost { veth, ns, slot };
        let (h, p) = (
            rh.veth.host_name().to_string(),
            rh.veth.peer_name().to_string(),
        );
        ip(&["addr", "add", &format!("198.18.{k}.1/24"), "dev", &h]);
        ip(&["addr", "add", &format!("198.19.{k}.1/24"), "dev", &h]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", rh.host_v6()),
            "dev",
            &h,
            "nodad",
        ]);
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", rh.host_world_v6()),
            "dev",
            &h,
            "nodad",
        ]);
        for a in [rh.v4(), rh.v4_alt(), rh.world_v4()] {
            rh.ns.ip(&["addr", "add", &format!("{a}/24"), "dev", &p]);
        }
        for a in [rh.v6(), rh.v6_alt(), rh.world_v6()] {
            rh.ns
                .ip(&["-6", "addr", "add", &format!("{a}/64"), "dev", &p, "nodad"]);
        }
        // Wait until both ends report carrier/UP (no fixed sleep).
        wait_until(&format!("veth {h}/{p} to come up"), SETUP_TIMEOUT, || {
            let host_up = std::fs::read_to_string(format!("/sys/class/net/{h}/operstate"))
                .map(|s| s.trim() == "up")
                .unwrap_or(false);
            let peer_up = rh
                .ns
                .ip(&["-o", "link", "show", "dev", &p])
                .contains("state UP");
            (host_up && peer_up).then_some(())
        });
        rh
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn veth(&self) -> &Veth {
        &self.veth
    }

    /// The slot number `k` used in names and addresses.
    pub fn slot(&self) -> u32 {
        self.slot.k
    }

    /// "Enterprise" IPv4 subnet of the link, `198.18.k.0/24`.
    pub fn v4_cidr(&self) -> String {
        format!("198.18.{}.0/24", self.slot.k)
    }

    /// "Enterprise" IPv6 subnet of the link, `fd5a:7a1e:0:k::/64`.
    pub fn v6_cidr(&self) -> String {
        format!("fd5a:7a1e:0:{:x}::/64", self.slot.k)
    }

    /// Host end, 198.18.k.1.
    pub fn host_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.slot.k as u8, 1))
    }

    /// Remote end, 198.18.k.2.
    pub fn v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.slot.k as u8, 2))
    }

    /// Second remote address in the same subnet, 198.18.k.3 (e.g. for a /32 segment).
    pub fn v4_alt(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.slot.k as u8, 3))
    }

    /// Remote address outside the enterprise subnet, 198.19.k.2.
    pub fn world_v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 19, self.slot.k as u8, 2))
    }

    fn v6_in(&self, net: u16, host: u16) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(0xfd5a, 0x7a1e, 0, net, 0, 0, 0, host))
    }

    /// Host end, fd5a:7a1e:0:k::1.
    pub fn host_v6(&self) -> IpAddr {
        self.v6_in(self.slot.k as u16, 1)
    }

    /// Remote end, fd5a:7a1e:0:k::2.
    pub fn v6(&self) -> IpAddr {
        self.v6_in(self.slot.k as u16, 2)
    }

    /// Second remote address, fd5a:7a1e:0:k::3.
    pub fn v6_alt(&self) -> IpAddr {
        self.v6_in(self.slot.k as u16, 3)
    }

    fn host_world_v6(&self) -> IpAddr {
        self.v6_in(0x8000 + self.slot.k as u16, 1)
    }

    /// Remote address outside the enterprise subnet, fd5a:7a1e:0:(8000+k)::2.
    pub fn world_v6(&self) -> IpAddr {
        self.v6_in(0x8000 + self.slot.k as u16, 2)
    }
}

/// Once per process: delete `ztai-n<pid>-<n>` namespaces of test processes that no longer exist.
fn sweep_stale_netns() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for name in netns_names() {
            let Some(pid) = stale_owner_pid(&name, "ztai-n") else {
                continue;
            };
            if pid != std::process::id() && !pid_alive(pid) {
                let _ = ip_raw(&["netns", "del", &name]);
            }
        }
    });
}

/// Waits until `name` is no longer listed by `ip netns list`.
pub fn wait_netns_gone(name: &str, timeout: Duration) -> bool {
    try_wait_until(timeout, || (!netns_exists(name)).then_some(())).is_some()
}
