//! Sockets bound before the agent attached its programs: post_bind never saw
//! them, so their owners are read from procfs (fd → socket inode → cgroup).
use std::{
    collections::HashMap,
    net::SocketAddr,
    os::{fd::{AsRawFd as _, FromRawFd as _, OwnedFd}, unix::fs::MetadataExt as _},
    path::Path,
};

use procfs::process::{FDTarget, Process};
use ztai_common::{AF_INET, AF_INET6, PROTO_TCP, PROTO_UDP, SegmentId};

use super::cgroups::{LabeledCgroup, pids_of};

/// A bound socket of a labeled workload, found in procfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundSocket {
    pub proto: u8,
    pub family: u16,
    pub local: SocketAddr,
    pub cgroup_id: u64,
    pub segment: SegmentId,
    /// The kernel's socket cookie, so the socket's own release removes its
    /// entry; None if it could not be read.
    pub cookie: Option<u64>,
}

/// SO_COOKIE of another process's socket: duplicate its fd with
/// pidfd_getfd (Linux 5.6, needs ptrace rights, which root has), then ask.
fn socket_cookie(pid: i32, fd: i32) -> Option<u64> {
    const SO_COOKIE: libc::c_int = 57;
    // SAFETY: raw syscalls with plain integer arguments; fds are owned below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd);
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) as i32;
        if dup < 0 {
            return None;
        }
        let dup = OwnedFd::from_raw_fd(dup);
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(dup.as_raw_fd(), libc::SOL_SOCKET, SO_COOKIE, (&mut cookie as *mut u64).cast(), &mut len);
        (rc == 0).then_some(cookie)
    }
}

fn own_netns_inode() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/net").ok().map(|m| m.ino())
}

/// Listening TCP and bound UDP sockets in this network namespace that belong
/// to processes of the scanned cgroups, labeled or not: the kernel records
/// unlabeled owners too, so a later policy that labels their cgroup applies
/// to listeners older than the agent. Processes that exit mid-scan are skipped.
pub fn bound_sockets(mount: &Path, cgroups: &[LabeledCgroup]) -> Vec<BoundSocket> {
    // inode → (proto, family, local addr)
    let mut table: HashMap<u64, (u8, u16, SocketAddr)> = HashMap::new();
    let listen = procfs::net::TcpState::Listen;
    for (entries, family) in [(procfs::net::tcp(), AF_INET), (procfs::net::tcp6(), AF_INET6)] {
        for e in entries.into_iter().flatten() {
            if e.state == listen {
                table.insert(e.inode, (PROTO_TCP, family, e.local_address));
            }
        }
    }
    for (entries, family) in [(procfs::net::udp(), AF_INET), (procfs::net::udp6(), AF_INET6)] {
        for e in entries.into_iter().flatten() {
            if e.local_address.port() != 0 {
                table.insert(e.inode, (PROTO_UDP, family, e.local_address));
            }
        }
    }
    let netns = own_netns_inode();
    let mut out = Vec::new();
    for cg in cgroups {
        for pid in pids_of(mount, &cg.rel_path) {
            let Ok(proc) = Process::new(pid) else { continue };
            let same_netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino()) == netns;
            if !same_netns {
                continue;
            }
            let Ok(fds) = proc.fd() else { continue };
            for fd in fds.flatten() {
                if let FDTarget::Socket(inode) = fd.target
                    && let Some((proto, family, local)) = table.get(&inode)
                {
                    out.push(BoundSocket {
                        proto: *proto,
                        family: *family,
                        local: *local,
                        cgroup_id: cg.id,
                        segment: cg.segment,
                        cookie: socket_cookie(pid, fd.fd),
                    });
                }
            }
        }
    }
    out.sort_by_key(|s| (s.proto, s.family, s.local));
    out.dedup_by_key(|s| (s.proto, s.family, s.local));
    out
}

/// A TCP connection that was established before the agent's programs were
/// attached, seen from a process under the attach point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstablishedConn {
    /// The side that opened the connection (connect()).
    pub initiator: SocketAddr,
    /// The side that accepted it (had a listener on its port).
    pub responder: SocketAddr,
    /// Segments of the ends that run under the attach point.
    pub initiator_segment: Option<SegmentId>,
    pub responder_segment: Option<SegmentId>,
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Established TCP connections of processes under the attach point (every
/// cgroup in `cgroups`, labeled or not: all of them run our hooks), oriented
/// by who accepted: an end with a listener on its local port is the responder.
pub fn established_tcp(mount: &Path, cgroups: &[LabeledCgroup]) -> Vec<EstablishedConn> {
    let established = procfs::net::TcpState::Established;
    let listen = procfs::net::TcpState::Listen;
    let mut conns = Vec::new();
    let mut listeners: Vec<SocketAddr> = Vec::new();
    for entries in [procfs::net::tcp(), procfs::net::tcp6()] {
        for e in entries.into_iter().flatten() {
            if e.state == established {
                conns.push((e.inode, unmap(e.local_address), unmap(e.remote_address)));
            } else if e.state == listen {
                listeners.push(unmap(e.local_address));
            }
        }
    }
    if conns.is_empty() {
        return Vec::new();
    }
    // socket inode → segment of its owner, for processes under the attach point.
    let netns = own_netns_inode();
    let mut owner: HashMap<u64, SegmentId> = HashMap::new();
    for cg in cgroups {
        for pid in pids_of(mount, &cg.rel_path) {
            let same_netns = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino()) == netns;
            let Ok(proc) = Process::new(pid) else { continue };
            let Ok(fds) = proc.fd() else { continue };
            if !same_netns {
                continue;
            }
            for fd in fds.flatten() {
                if let FDTarget::Socket(inode) = fd.target {
                    owner.insert(inode, cg.segment);
                }
            }
        }
    }
    let listens_on = |a: &SocketAddr| {
        listeners.iter().any(|l| l.port() == a.port() && (l.ip().is_unspecified() || l.ip() == a.ip()))
    };
    // By (local, remote), to find the other end of local connections.
    let by_ends: HashMap<(SocketAddr, SocketAddr), u64> = conns.iter().map(|(i, l, r)| ((*l, *r), *i)).collect();
    let mut out = Vec::new();
    for (inode, local, remote) in &conns {
        let Some(seg) = owner.get(inode).copied() else { continue };
        let peer_segment = by_ends.get(&(*remote, *local)).and_then(|i| owner.get(i).copied());
        let conn = if listens_on(local) {
            EstablishedConn { initiator: *remote, responder: *local, initiator_segment: peer_segment, responder_segment: Some(seg) }
        } else {
            EstablishedConn { initiator: *local, responder: *remote, initiator_segment: Some(seg), responder_segment: peer_segment }
        };
        out.push(conn);
    }
    // A connection between two local processes shows up from both ends.
    out.sort_by_key(|c| (c.initiator, c.responder));
    out.dedup_by_key(|c| (c.initiator, c.responder));
    out
}
