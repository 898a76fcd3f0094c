//! post_bind4/6 and sock_release: the socket-owner table that gives a local
//! destination its identity.
use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockContext,
};
use ztai_common::{
    COUNTER_DENIED, COUNTER_SOCKET_TABLE_FULL, DIRECTION_EGRESS, HOOK_POST_BIND4, HOOK_POST_BIND6,
    PROTO_TCP, PROTO_UDP, REASON_SOCKET_TABLE_FULL, SEGMENT_HOST, SEGMENT_WORLD, SocketOwner,
    VERDICT_DENY, AF_INET, AF_INET6, SocketKey,
};

use crate::{
    events::{Flow, count, report},
    addr::v4_mapped,
    identity::{current_segment, read_ip6},
    maps::{SOCKET_KEYS, SOCKET_OWNERS},
};

const PASS: i32 = 1;
/// Makes bind() fail with EPERM.
const REJECT: i32 = 0;

/// The bound socket's key from a post_bind context, which allows reading
/// only the address field of its own family.
#[inline(always)]
fn bound_key(ctx: &SockContext, family: u16) -> SocketKey {
    let sk = ctx.sock;
    let proto = unsafe { core::ptr::read_volatile(&(*sk).protocol) } as u8;
    let port = unsafe { core::ptr::read_volatile(&(*sk).src_port) } as u16;
    let addr = if family == AF_INET {
        v4_mapped(unsafe { core::ptr::read_volatile(&(*sk).src_ip4) })
    } else {
        unsafe { read_ip6(&(*sk).src_ip6) }
    };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SocketKey { netns_cookie, addr, port, family: family as u8, proto, _pad: 0 }
}

pub fn record_bound_socket4(ctx: &SockContext) -> i32 {
    record_bound_socket(ctx, bound_key(ctx, AF_INET))
}

pub fn record_bound_socket6(ctx: &SockContext) -> i32 {
    record_bound_socket(ctx, bound_key(ctx, AF_INET6))
}

#[inline(always)]
fn record_bound_socket(ctx: &SockContext, key: SocketKey) -> i32 {
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return PASS;
    }
    let generation = crate::maps::CONFIG.get(0).map(|c| ztai_common::generation_slot(c.active_gen)).unwrap_or(0);
    let (segment, cgroup_id) = current_segment(generation);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Unlabeled owners are recorded too: the entry keeps the cgroup id, so a
    // later policy that labels that cgroup applies to its existing listeners.
    if remember_owner(&key, cookie, cgroup_id, segment) {
        return PASS;
    }
    count(COUNTER_SOCKET_TABLE_FULL);
    if segment == SEGMENT_HOST {
        // Unrecorded means `host`, which is what it is.
        return PASS;
    }
    // A labeled listener whose owner cannot be recorded would pass as `host`:
    // refuse the bind instead, and say why.
    aya_log_ebpf::warn!(ctx, "socket-owner table full: bind of port {} by segment {} refused", key.port, segment);
    count(COUNTER_DENIED);
    let flow = Flow {
        cgroup_id,
        sock_cookie: cookie,
        src_segment: segment,
        dst_segment: SEGMENT_WORLD,
        src_addr: key.addr,
        dst_addr: [0; 4],
        src_port: key.port,
        dst_port: 0,
        proto: key.proto,
        direction: DIRECTION_EGRESS,
        hook: if key.family as u16 == AF_INET { HOOK_POST_BIND4 } else { HOOK_POST_BIND6 },
    };
    report(&flow, VERDICT_DENY, REASON_SOCKET_TABLE_FULL);
    REJECT
}

/// Records `key` as owned by this socket; false if a table is full.
#[inline(always)]
pub fn remember_owner(key: &SocketKey, cookie: u64, cgroup_id: u64, segment: u32) -> bool {
    let owner = SocketOwner { sock_cookie: cookie, cgroup_id, segment, _pad: 0 };
    if SOCKET_OWNERS.insert(key, &owner, 0).is_err() {
        return false;
    }
    if SOCKET_KEYS.insert(&cookie, key, 0).is_err() {
        let _ = SOCKET_OWNERS.remove(key);
        return false;
    }
    true
}

pub fn forget_released_socket(ctx: &SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(key) = (unsafe { SOCKET_KEYS.get(&cookie) }) else {
        return PASS;
    };
    let key = *key;
    let _ = SOCKET_KEYS.remove(&cookie);
    if let Some(owner) = unsafe { SOCKET_OWNERS.get(&key) } {
        // Only the socket that made the entry removes it: the port may have
        // been bound again by another socket (SO_REUSEPORT) since.
        if owner.sock_cookie == cookie {
            let _ = SOCKET_OWNERS.remove(&key);
        }
    }
    PASS
}
