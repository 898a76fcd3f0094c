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

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

fn bpf_syscall(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: bpf(2) reads/writes within the 128-byte attr we pass.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as libc::c_uint)
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Pins at `path` (on bpffs) a one-entry array map with a `value_size`-byte value whose first
/// bytes are `value`: stands in for a map another agent version left pinned.
pub fn pin_array_map(path: &Path, value_size: u32, value: &[u8]) -> io::Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    assert!(value.len() <= value_size as usize, "value longer than value_size");
    // map_create: map_type u32 @0, key_size @4, value_size @8, max_entries @12.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_MAP_TYPE_ARRAY) | (4u64 << 32);
    attr[1] = u64::from(value_size) | (1u64 << 32);
    let fd = bpf_syscall(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: a successful BPF_MAP_CREATE returns a new fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let key = 0u32;
    let mut bytes = vec![0u8; value_size as usize];
    bytes[..value.len()].copy_from_slice(value);
    // map_elem: map_fd u32 @0, key u64 @8, value u64 @16, flags u64 @24.
    let mut attr = [0u64; 16];
    attr[0] = fd.as_raw_fd() as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = bytes.as_ptr() as u64;
    bpf_syscall(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    // obj_pin: pathname u64 @0, bpf_fd u32 @8.
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u64; 16];
    attr[0] = cpath.as_ptr() as u64;
    attr[1] = fd.as_raw_fd() as u64;
    bpf_syscall(BPF_OBJ_PIN, &mut attr)?;
    Ok(())
}
