//! Labeled workloads that live in their own network namespace (pod-style,
//! joined to the host by veth) are identified by their addresses. Their
//! namespaces' addresses are read by entering each namespace from a
//! short-lived thread (setns affects only the calling thread).
//!
//! This is polled by the runtime's rescan: address changes inside another
//! namespace raise no event the host namespace can see, and one netlink
//! socket per namespace is left for later.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use ztai_common::{SEGMENT_HOST, SegmentId};

use super::{
    cgroups::{LabeledCgroup, pids_of},
    local_addrs::{host_addresses, own_netns_cookie},
};

/// One foreign network namespace holding labeled processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadNetns {
    pub cookie: u64,
    pub addrs: BTreeSet<IpAddr>,
    /// Segments of the labeled cgroups whose processes live there.
    pub segments: BTreeSet<SegmentId>,
}

/// Addresses a workload can be reached at from elsewhere: not loopback, not
/// link-local (those repeat on every link and identify nobody).
fn is_identifying(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

fn read_netns(pid: i32) -> Option<(u64, BTreeSet<IpAddr>)> {
    let ns = File::open(format!("/proc/{pid}/ns/net")).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only; the thread ends right after.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            let cookie = own_netns_cookie().ok()?;
            let addrs = host_addresses().ok()?;
            Some((cookie, addrs))
        })
        .join()
        .ok()
        .flatten()
    })
}

/// Foreign namespaces of labeled processes, with their addresses.
pub fn scan(mount: &Path, cgroups: &[LabeledCgroup]) -> Vec<WorkloadNetns> {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    // netns inode → (a pid inside, segments)
    let mut found: HashMap<u64, (i32, BTreeSet<SegmentId>)> = HashMap::new();
    for cg in cgroups.iter().filter(|c| c.segment != SEGMENT_HOST) {
        for pid in pids_of(mount, &cg.rel_path) {
            let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else { continue };
            if Some(meta.ino()) == own {
                continue;
            }
            found.entry(meta.ino()).or_insert_with(|| (pid, BTreeSet::new())).1.insert(cg.segment);
        }
    }
    let mut out: Vec<WorkloadNetns> = found
        .into_values()
        .filter_map(|(pid, segments)| {
            let (cookie, addrs) = read_netns(pid)?;
            Some(WorkloadNetns { cookie, addrs, segments })
        })
        .collect();
    out.sort_by_key(|n| n.cookie);
    out
}

/// address → segment for the kernel. A namespace shared by processes of
/// different segments, or an address claimed by two namespaces of different
/// segments, cannot name one segment: those addresses are left out (they
/// then count as `world`, which no labeled segment may reach by default) and
/// returned as conflicts to report.
pub fn address_segments(namespaces: &[WorkloadNetns]) -> (BTreeMap<IpAddr, SegmentId>, Vec<IpAddr>) {
    let mut map: BTreeMap<IpAddr, Option<SegmentId>> = BTreeMap::new();
    for ns in namespaces {
        let seg = if ns.segments.len() == 1 { ns.segments.first().copied() } else { None };
        for ip in ns.addrs.iter().filter(|ip| is_identifying(ip)) {
            map.entry(*ip)
                .and_modify(|cur| {
                    if *cur != seg {
                        *cur = None
                    }
                })
                .or_insert(seg);
        }
    }
    let conflicts = map.iter().filter(|(_, s)| s.is_none()).map(|(ip, _)| *ip).collect();
    (map.into_iter().filter_map(|(ip, s)| s.map(|s| (ip, s))).collect(), conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(cookie: u64, addrs: &[&str], segments: &[u32]) -> WorkloadNetns {
        WorkloadNetns {
            cookie,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            segments: segments.iter().copied().collect(),
        }
    }

    #[test]
    fn addresses_name_their_namespaces_segment_but_never_loopback_or_link_local() {
        let (map, conflicts) = address_segments(&[ns(1, &["198.18.1.2", "127.0.0.1", "fe80::1", "fd5a:7a1e::2"], &[2])]);
        assert_eq!(map.len(), 2);
        assert_eq!(map[&"198.18.1.2".parse::<IpAddr>().unwrap()], 2);
        assert!(conflicts.is_empty());
    }

    #[test]
    fn ambiguous_addresses_are_left_out_and_reported() {
        let (map, conflicts) = address_segments(&[
            ns(1, &["198.18.1.2"], &[2, 3]),
            ns(2, &["198.18.1.3"], &[2]),
            ns(3, &["198.18.1.3"], &[3]),
        ]);
        assert!(map.is_empty());
        assert_eq!(conflicts.len(), 2);
    }
}
