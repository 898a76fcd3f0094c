//! connect4/6, sendmsg4/6 and recvmsg4/6: the egress verdict for a process's
//! connection or datagram, decided before anything leaves the socket.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockAddrContext,
};
use ztai_common::{
    AF_INET, AF_INET6, CONFIG_FLAG_POLICY_LOADED, COUNTER_ALLOWED,
    COUNTER_AUDITED, COUNTER_DENIED, COUNTER_SOCKET_TABLE_FULL, COUNTER_UDP_REPLIES,
    DIRECTION_EGRESS, ExchangeKey, ExchangeValue, FlowKey, HOOK_SENDMSG4, HOOK_SENDMSG6, PROTO_TCP,
    PROTO_UDP, REASON_NO_POLICY, REASON_SOCKET_TABLE_FULL,
    REASON_UNKNOWN_FAMILY, SEGMENT_HOST, SEGMENT_WORLD, SocketKey, UDP_EXCHANGE_IDLE_NS,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};

use crate::{
    addr::{Addr, v4_mapped},
    events::{Flow, count, report},
    identity::{current_segment, destination_segment, read_ip6, socket_key},
    flows::{ORIG, add},
    maps::{CONFIG, SOCK_FLOWS, SOCKET_OWNERS, UDP_EXCHANGES},
    verdict::{ALLOW, Verdict, decide, deny_or_audit, unless_labels_incomplete},
};

const PASS: i32 = 1;
/// Makes connect()/sendmsg() fail with EPERM.
const REJECT: i32 = 0;

#[inline(always)]
fn read_u32(p: *const u32) -> u32 {
    // Volatile keeps each context read a separate 4-byte load, the only
    // access width every kernel's verifier accepts for these fields.
    unsafe { core::ptr::read_volatile(p) }
}

/// Destination (address, port) the process asked for, or None for a family
/// the program does not know. `V6` is the hook's family: the verifier lets a
/// v4 hook read only `user_ip4` and a v6 hook only `user_ip6`.
#[inline(always)]
fn user_destination<const V6: bool>(ctx: &SockAddrContext) -> Option<(Addr, u16)> {
    let sa = ctx.sock_addr;
    let family = read_u32(unsafe { &(*sa).user_family }) as u16;
    let port = u16::from_be(read_u32(unsafe { &(*sa).user_port }) as u16);
    if !V6 && family == AF_INET {
        Some((v4_mapped(read_u32(unsafe { &(*sa).user_ip4 })), port))
    } else if V6 && family == AF_INET6 {
        Some((unsafe { read_ip6(&(*sa).user_ip6) }, port))
    } else {
        None
    }
}

#[inline(always)]
fn finish(flow: &Flow, v: Verdict) -> i32 {
    match v.verdict {
        VERDICT_ALLOW => {
            count(COUNTER_ALLOWED);
            PASS
        }
        VERDICT_AUDIT => {
            count(COUNTER_AUDITED);
            report(flow, VERDICT_AUDIT, v.reason);
            PASS
        }
        _ => {
            count(COUNTER_DENIED);
            report(flow, VERDICT_DENY, v.reason);
            REJECT
        }
    }
}

/// A UDP server replying to a peer it heard from in the last
/// `UDP_EXCHANGE_IDLE_NS` is part of that exchange, not a new flow.
#[inline(always)]
fn is_udp_reply(cookie: u64, daddr: &Addr, dport: u16) -> bool {
    let key = ExchangeKey { sock_cookie: cookie, peer_addr: *daddr, peer_port: dport, _pad: [0; 6] };
    match unsafe { UDP_EXCHANGES.get(&key) } {
        Some(ex) => unsafe { bpf_ktime_get_ns() }.wrapping_sub(ex.last_seen_ns) < UDP_EXCHANGE_IDLE_NS,
        None => false,
    }
}

pub fn authorize_egress<const V6: bool>(ctx: &SockAddrContext, hook: u8) -> i32 {
    let sa = ctx.sock_addr;
    let sk: *const bpf_sock = unsafe { (*sa).__bindgen_anon_1.sk };
    let proto = read_u32(unsafe { &(*sa).protocol }) as u8;
    let (generation, config_flags, host_netns) = match CONFIG.get(0) {
        Some(c) => (ztai_common::generation_slot(c.active_gen), c.flags, c.host_netns_cookie),
        None => (0, 0, 0),
    };
    let (src, cgroup_id) = current_segment(generation);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let own_key = socket_key(sk, netns);
    let (src_addr, src_port) = match own_key {
        Some(k) => (k.addr, k.port),
        None => ([0; 4], 0),
    };
    let mut flow = Flow {
        cgroup_id,
        sock_cookie: cookie,
        src_segment: src,
        dst_segment: SEGMENT_WORLD,
        src_addr,
        dst_addr: [0; 4],
        src_port,
        dst_port: 0,
        proto,
        direction: DIRECTION_EGRESS,
        hook,
    };

    if config_flags & CONFIG_FLAG_POLICY_LOADED == 0 {
        // Attached before any policy was written: nothing is known, deny.
        return finish(&flow, Verdict { verdict: VERDICT_DENY, reason: REASON_NO_POLICY });
    }

    let Some((daddr, dport)) = user_destination::<V6>(ctx) else {
        if src == SEGMENT_HOST {
            return PASS;
        }
        return finish(&flow, deny_or_audit(generation, src, SEGMENT_WORLD, REASON_UNKNOWN_FAMILY));
    };
    flow.dst_addr = daddr;
    flow.dst_port = dport;

    if proto != PROTO_TCP && proto != PROTO_UDP {
        // ICMP "ping" sockets and the like: no rule can name them, so a
        // labeled segment may not use them; unlabeled ones are not our business.
        if src == SEGMENT_HOST {
            return PASS;
        }
        return finish(&flow, deny_or_audit(generation, src, SEGMENT_WORLD, ztai_common::REASON_NO_RULE));
    }

    if proto == PROTO_UDP && is_udp_reply(cookie, &daddr, dport) {
        count(COUNTER_UDP_REPLIES);
        return PASS;
    }

    let dst = destination_segment(ctx, netns, host_netns, generation, proto, &daddr, dport);
    flow.dst_segment = dst;
    let mut v = unless_labels_incomplete(decide(generation, src, dst, proto, dport), src, dst, config_flags);

    if v.verdict == VERDICT_ALLOW
        && src != SEGMENT_HOST
        && (hook == HOOK_SENDMSG4 || hook == HOOK_SENDMSG6)
        && src_port != 0
    {
        // A labeled UDP sender's autobound port must be known to be its own,
        // or datagrams to it would be judged as going to `host`.
        v = remember_udp_sender(own_key, cookie, cgroup_id, src, generation);
        if v.verdict != VERDICT_ALLOW {
            aya_log_ebpf::warn!(ctx, "socket-owner table full: datagram from segment {} refused", src);
        }
    }
    let key = FlowKey { src, dst, dst_addr: daddr, dst_port: dport, proto, verdict: v.verdict };
    if v.verdict == VERDICT_DENY {
        // A denied attempt never sends a packet; count it as one, of no bytes.
        add(&key, ORIG, 1, 0);
    } else {
        remember_socket_flow(cookie, &key);
    }
    finish(&flow, v)
}

/// What the packet hooks need to count this socket's packets under the
/// flow just authorized (for unconnected UDP: its latest destination).
#[inline(always)]
fn remember_socket_flow(cookie: u64, key: &FlowKey) {
    if let Some(current) = SOCK_FLOWS.get_ptr_mut(&cookie) {
        if unsafe { *current } != *key {
            unsafe { *current = *key };
        }
        return;
    }
    let _ = SOCK_FLOWS.insert(&cookie, key, 0);
}

#[inline(always)]
fn remember_udp_sender(
    own_key: Option<SocketKey>,
    cookie: u64,
    cgroup_id: u64,
    segment: u32,
    generation: u8,
) -> Verdict {
    let Some(key) = own_key else {
        return ALLOW;
    };
    if unsafe { SOCKET_OWNERS.get(&key) }.is_some() {
        return ALLOW;
    }
    if !crate::sock::remember_owner(&key, cookie, cgroup_id, segment) {
        count(COUNTER_SOCKET_TABLE_FULL);
        return deny_or_audit(generation, segment, SEGMENT_WORLD, REASON_SOCKET_TABLE_FULL);
    }
    ALLOW
}

/// recvmsg4/6: the sender of a datagram this socket received may get replies.
/// The kernel requires these programs to return 1.
pub fn record_udp_exchange<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let Some((peer, port)) = user_destination::<V6>(ctx) else {
        return PASS;
    };
    let key = ExchangeKey {
        sock_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        peer_addr: peer,
        peer_port: port,
        _pad: [0; 6],
    };
    let now = unsafe { bpf_ktime_get_ns() };
    match UDP_EXCHANGES.get_ptr_mut(&key) {
        Some(ex) => unsafe { (*ex).last_seen_ns = now },
        None => {
            // LRU: a full table evicts the stalest exchange, never blocks.
            let _ = UDP_EXCHANGES.insert(&key, &ExchangeValue { last_seen_ns: now }, 0);
        }
    }
    PASS
}
