//! Who is talking to whom: the segment of the calling process (by cgroup) and
//! of a destination (by the owner of the local socket it reaches, else by cidrs).
use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, bpf_sock_tuple},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_sk_lookup_tcp,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        bpf_sk_lookup_udp, bpf_sk_release,
    },
    maps::lpm_trie::Key,
};
use ztai_common::{
    AF_INET, AF_INET6, CIDR_KEY_FIXED_BITS, LocalAddrKey, PROTO_TCP, SEGMENT_HOST, SEGMENT_WORLD,
    SegmentId, SocketKey, cidr_key_data, maps::CGROUP_MAX_DEPTH,
};

use crate::{
    addr::{Addr, is_always_local, is_v4_mapped, to_bytes, v4_mapped},
    maps::{CGROUP_LABELS, CIDRS, LOCAL_ADDRS, SOCKET_OWNERS, WORKLOAD_ADDRS},
};

/// Segment of the current task's cgroup. The agent labels every cgroup it has
/// seen (unlabeled ones as `host`), so a miss means a cgroup newer than its
/// last scan: it inherits from its nearest labeled ancestor at once, instead
/// of passing as `host` until the agent catches up.
#[inline(always)]
pub fn current_segment(generation: u8) -> (SegmentId, u64) {
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    let segment = nearest_label(generation, cgroup, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) });
    (segment, cgroup)
}

/// The label of `cgroup`, else of its nearest labeled ancestor, else `host`.
/// `ancestor(level)` is the cgroup's ancestor at `level` (0 = root), or 0
/// past the cgroup's own depth.
#[inline(always)]
fn nearest_label(generation: u8, cgroup: u64, ancestor: impl Fn(i32) -> u64) -> SegmentId {
    if let Some(label) = unsafe { CGROUP_LABELS.get(&cgroup) } {
        return label.segment(generation);
    }
    let mut segment = SEGMENT_HOST;
    let mut level = 0;
    while level < CGROUP_MAX_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 || id == cgroup {
            break;
        }
        if let Some(label) = unsafe { CGROUP_LABELS.get(&id) } {
            segment = label.segment(generation);
        }
        level += 1;
    }
    segment
}

/// Segment of the cgroup owning a packet's socket (cgroup_skb programs, where
/// "current" is whatever task the softirq interrupted).
#[inline(always)]
pub fn skb_segment<C: EbpfContext>(ctx: &C, generation: u8) -> (SegmentId, u64) {
    let skb = ctx.as_ptr() as *mut _;
    let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
    let segment = nearest_label(generation, cgroup, |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) });
    (segment, cgroup)
}

/// Segment of a cgroup that is not the caller's (a socket owner's).
#[inline(always)]
pub fn cgroup_segment(generation: u8, cgroup: u64, recorded: SegmentId) -> SegmentId {
    match unsafe { CGROUP_LABELS.get(&cgroup) } {
        Some(label) => label.segment(generation),
        // Cgroup gone or newer than the agent's scan: keep what was true at bind.
        None => recorded,
    }
}

/// Key of a bound socket as `post_bind` records it and as the socket lookup
/// finds it, so both sides agree byte for byte. Reads every field, which only
/// a socket pointer (not a post_bind context) allows.
#[inline(always)]
pub fn socket_key(sk: *const bpf_sock, netns_cookie: u64) -> Option<SocketKey> {
    // Every field is read unconditionally: choosing a field by family would
    // let the compiler compute a variable offset from the socket pointer,
    // which the verifier forbids.
    let family = unsafe { core::ptr::read_volatile(&(*sk).family) } as u16;
    let proto = unsafe { core::ptr::read_volatile(&(*sk).protocol) } as u8;
    let port = unsafe { core::ptr::read_volatile(&(*sk).src_port) } as u16;
    let ip4 = unsafe { core::ptr::read_volatile(&(*sk).src_ip4) };
    let ip6 = unsafe { read_ip6(&(*sk).src_ip6) };
    let addr = if family == AF_INET {
        v4_mapped(ip4)
    } else if family == AF_INET6 {
        ip6
    } else {
        return None;
    };
    Some(SocketKey { netns_cookie, addr, port, family: family as u8, proto, _pad: 0 })
}

/// # Safety
/// `p` must point at readable context or socket memory.
#[inline(always)]
pub unsafe fn read_ip6(p: &[u32; 4]) -> Addr {
    unsafe {
        [
            core::ptr::read_volatile(&p[0]),
            core::ptr::read_volatile(&p[1]),
            core::ptr::read_volatile(&p[2]),
            core::ptr::read_volatile(&p[3]),
        ]
    }
}

#[inline(always)]
pub fn is_local(netns_cookie: u64, daddr: &Addr) -> bool {
    if is_always_local(daddr) {
        return true;
    }
    let key = LocalAddrKey { netns_cookie, addr: *daddr };
    unsafe { LOCAL_ADDRS.get(&key) }.is_some()
}

/// The socket a connection to `daddr:dport` would reach in the caller's
/// network namespace, as the kernel itself would pick it (so a listener on
/// 127.0.0.1 and one on 0.0.0.0 are told apart correctly).
#[inline(always)]
fn owner_of_local_destination<C: EbpfContext>(
    ctx: &C,
    generation: u8,
    netns_cookie: u64,
    proto: u8,
    daddr: &Addr,
    dport: u16,
) -> SegmentId {
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size;
    if is_v4_mapped(daddr) {
        tuple.__bindgen_anon_1.ipv4.daddr = daddr[3];
        tuple.__bindgen_anon_1.ipv4.dport = dport.to_be();
        size = core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>();
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = *daddr;
        tuple.__bindgen_anon_1.ipv6.dport = dport.to_be();
        size = core::mem::size_of::<aya_ebpf::bindings::bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>();
    }
    // BPF_F_CURRENT_NETNS: look in the caller's namespace.
    let netns = u64::MAX;
    let sk = unsafe {
        if proto == PROTO_TCP {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size as u32, netns, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size as u32, netns, 0)
        }
    };
    if sk.is_null() {
        // Nothing listens: the kernel will refuse the connection anyway.
        return SEGMENT_HOST;
    }
    let key = socket_key(sk, netns_cookie);
    unsafe { bpf_sk_release(sk as *mut _) };
    match key {
        Some(key) => match unsafe { SOCKET_OWNERS.get(&key) } {
            Some(owner) => cgroup_segment(generation, owner.cgroup_id, owner.segment),
            // Never recorded: bound outside the attach point or before the
            // agent, and not found by its procfs scan, so not labeled.
            None => SEGMENT_HOST,
        },
        None => SEGMENT_HOST,
    }
}

/// The owner of a listener in the host's network namespace that a caller in
/// another namespace (a pod-style workload) reaches through one of the host's
/// addresses. The kernel's socket lookup only searches the caller's own
/// namespace, so the bound-socket table is asked, as the host's stack would
/// deliver: the exact address first, then the wildcard of its family, then a
/// dual-stack IPv6 wildcard. No recorded listener: `host`.
#[inline(always)]
fn owner_of_host_listener(generation: u8, host_netns: u64, proto: u8, daddr: &Addr, dport: u16) -> SegmentId {
    let v4 = is_v4_mapped(daddr);
    // One key, rewritten between lookups: the stack is shared with the rest
    // of connect/sendmsg, and 6.1's verifier caps the frames at 512 bytes.
    let mut key = SocketKey {
        netns_cookie: host_netns,
        addr: *daddr,
        port: dport,
        family: if v4 { AF_INET } else { AF_INET6 } as u8,
        proto,
        _pad: 0,
    };
    if let Some(owner) = unsafe { SOCKET_OWNERS.get(&key) } {
        return cgroup_segment(generation, owner.cgroup_id, owner.segment);
    }
    key.addr = if v4 { v4_mapped(0) } else { [0; 4] };
    if let Some(owner) = unsafe { SOCKET_OWNERS.get(&key) } {
        return cgroup_segment(generation, owner.cgroup_id, owner.segment);
    }
    if v4 {
        key.family = AF_INET6 as u8;
        key.addr = [0; 4];
        if let Some(owner) = unsafe { SOCKET_OWNERS.get(&key) } {
            return cgroup_segment(generation, owner.cgroup_id, owner.segment);
        }
    }
    SEGMENT_HOST
}

/// Segment of a destination: the owner of the local socket for this host's
/// addresses (also when the caller is a workload in its own network namespace
/// reaching the host through one of them), else the longest matching cidrs
/// prefix, else `world`.
#[inline(always)]
pub fn destination_segment<C: EbpfContext>(
    ctx: &C,
    netns_cookie: u64,
    host_netns: u64,
    generation: u8,
    proto: u8,
    daddr: &Addr,
    dport: u16,
) -> SegmentId {
    if is_local(netns_cookie, daddr) {
        return owner_of_local_destination(ctx, generation, netns_cookie, proto, daddr, dport);
    }
    if host_netns != 0 && host_netns != netns_cookie && is_local(host_netns, daddr) {
        return owner_of_host_listener(generation, host_netns, proto, daddr, dport);
    }
    remote_segment(generation, daddr)
}

/// A labeled workload in its own network namespace is known by its address;
/// anything else remote by the longest cidrs prefix, else `world`.
#[inline(always)]
pub fn remote_segment(generation: u8, addr: &Addr) -> SegmentId {
    if let Some(seg) = unsafe { WORKLOAD_ADDRS.get(addr) } {
        return seg.segment(generation);
    }
    let key = Key::new(CIDR_KEY_FIXED_BITS + 128, cidr_key_data(generation, &to_bytes(addr)));
    match CIDRS.get(&key) {
        Some(seg) => seg.segment,
        None => SEGMENT_WORLD,
    }
}
