//! Counting eBPF programs attached directly to a cgroup (BPF_PROG_QUERY), to check that the
//! agent attaches under the test's subtree and detaches everything when it exits.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

const BPF_PROG_QUERY: libc::c_long = 16;

/// The cgroup attach points the ztai agent uses (values of `enum bpf_attach_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    Inet4PostBind = 12,
    Inet6PostBind = 13,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Udp4Sendmsg = 14,
    Udp6Sendmsg = 15,
    Udp4Recvmsg = 19,
    Udp6Recvmsg = 20,
    InetSockRelease = 34,
}

impl AttachType {
    pub const ALL: [AttachType; 9] = [
        AttachType::Inet4Connect,
        AttachType::Inet6Connect,
        AttachType::Udp4Sendmsg,
        AttachType::Udp6Sendmsg,
        AttachType::Udp4Recvmsg,
        AttachType::Udp6Recvmsg,
        AttachType::Inet4PostBind,
        AttachType::Inet6PostBind,
        AttachType::InetSockRelease,
    ];
}

/// Number of programs attached *directly* to the cgroup directory `cgroup` for `attach_type`
/// (not inherited ones).
pub fn attached_count(cgroup: &Path, attach_type: AttachType) -> io::Result<u32> {
    let dir = std::fs::File::open(cgroup)?;
    // union bpf_attr, query variant: target_fd u32 @0, attach_type u32 @4, query_flags u32 @8,
    // attach_flags u32 @12, prog_ids u64 @16, prog_cnt u32 @24, (newer fields after, zero).
    let mut attr = [0u64; 8];
    let words: &mut [u32; 16] =
        // SAFETY: [u64; 8] and [u32; 16] have the same size; u32 alignment is weaker.
        unsafe { &mut *(attr.as_mut_ptr() as *mut [u32; 16]) };
    words[0] = dir.as_raw_fd() as u32;
    words[1] = attach_type as u32;
    // SAFETY: bpf(BPF_PROG_QUERY) reads/writes within the 64-byte attr we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let words: &[u32; 16] = unsafe { &*(attr.as_ptr() as *const [u32; 16]) };
    Ok(words[6])
}

/// `(attach type, count)` for each of [`AttachType::ALL`].
pub fn attached_counts(cgroup: &Path) -> io::Result<Vec<(AttachType, u32)>> {
    AttachType::ALL
        .iter()
        .map(|&t| Ok((t, attached_count(cgroup, t)?)))
        .collect()
}

/// Total programs attached directly to `cgroup` over [`AttachType::ALL`].
pub fn attached_total(cgroup: &Path) -> io::Result<u32> {
    Ok(attached_counts(cgroup)?.iter().map(|(_, n)| n).sum())
}
