//! cgroup_skb ingress/egress (4.10): per-flow packet and byte counters for
//! every socket under the attach point, and the inbound verdict for
//! connections whose initiator is outside it (remote hosts, unlabeled local
//! processes elsewhere), which no connect/sendmsg hook of ours ever saw.
use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SkBuffContext};
use ztai_common::{
    COUNTED_BY_INITIATOR, COUNTED_BY_RESPONDER, COUNTER_ALLOWED, COUNTER_AUDITED, COUNTER_DENIED,
    COUNTER_INGRESS_DROPPED, CONFIG_FLAG_POLICY_LOADED, Conn, DIRECTION_INGRESS, FlowKey, HOOK_SKB_INGRESS,
    PROTO_TCP, PROTO_UDP, REASON_UNPARSEABLE, SEGMENT_HOST, TupleKey, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY,
};

use crate::{
    addr::{Addr, is_always_local, v4_mapped},
    events::{Flow, count, report_ingress_drop, report_without_task},
    flows::{ORIG, REPLY, add},
    identity::{remote_segment, skb_segment},
    maps::{CONFIG, CONNS, LOCAL_ADDRS, SOCK_FLOWS},
    verdict::{Verdict, decide, deny_or_audit, unless_labels_incomplete},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

struct Packet {
    /// As the packet travels: saddr is its sender.
    tuple: TupleKey,
    bytes: u64,
    packets: u64,
    /// A TCP SYN without ACK: a new connection, whatever an older one with
    /// the same 4-tuple left in `CONNS`.
    opens: bool,
}

enum Parsed {
    Packet(Packet),
    /// ICMP: nothing to count or judge here.
    Other,
    /// Anything else: a protocol no rule can name (SCTP, GRE, …) or TCP/UDP
    /// whose ports we cannot read (IPv6 extension headers). A labeled
    /// receiver drops it. Carries what could be read (addresses, protocol;
    /// no ports), for the report.
    Unparseable(TupleKey),
}

#[inline(always)]
fn parse(ctx: &SkBuffContext) -> Parsed {
    let skb = ctx.skb.skb;
    let protocol = u16::from_be(unsafe { core::ptr::read_volatile(&(*skb).protocol) } as u16);
    let unknown = Parsed::Unparseable(TupleKey::default());
    let (proto, saddr, daddr, l4) = if protocol == ETH_P_IP {
        let Ok(vihl) = ctx.load::<u8>(0) else { return unknown };
        let Ok(proto) = ctx.load::<u8>(9) else { return unknown };
        let (Ok(s), Ok(d)) = (ctx.load::<u32>(12), ctx.load::<u32>(16)) else { return unknown };
        (proto, v4_mapped(s), v4_mapped(d), ((vihl & 0x0f) as usize) * 4)
    } else if protocol == ETH_P_IPV6 {
        let Ok(next) = ctx.load::<u8>(6) else { return unknown };
        if next == IPPROTO_ICMPV6 {
            return Parsed::Other;
        }
        // Both addresses in one load (one helper call, not eight).
        let Ok(a) = ctx.load::<[u32; 8]>(8) else { return unknown };
        (next, [a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]], 40)
    } else {
        return Parsed::Other;
    };
    // Whatever is not TCP/UDP (any IPv6 next header but those may hide
    // TCP/UDP behind extension headers, which we do not walk).
    let unjudgeable = Parsed::Unparseable(TupleKey { saddr, daddr, sport: 0, dport: 0, proto, _pad: [0; 3] });
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return if proto == IPPROTO_ICMP { Parsed::Other } else { unjudgeable };
    }
    let (Ok(sport), Ok(dport)) = (ctx.load::<u16>(l4), ctx.load::<u16>(l4 + 2)) else {
        return unjudgeable;
    };
    let opens = proto == PROTO_TCP
        && match ctx.load::<u8>(l4 + 13) {
            Ok(flags) => flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN,
            Err(_) => return unjudgeable,
        };
    // A GSO packet stands for several on the wire.
    let segs = unsafe { core::ptr::read_volatile(&(*skb).gso_segs) };
    Parsed::Packet(Packet {
        tuple: TupleKey {
            saddr,
            daddr,
            sport: u16::from_be(sport),
            dport: u16::from_be(dport),
            proto,
            _pad: [0; 3],
        },
        bytes: ctx.len() as u64,
        packets: if segs > 1 { segs as u64 } else { 1 },
        opens,
    })
}

#[inline(always)]
fn reversed(t: &TupleKey) -> TupleKey {
    TupleKey { saddr: t.daddr, daddr: t.saddr, sport: t.dport, dport: t.sport, proto: t.proto, _pad: [0; 3] }
}

/// Where a packet is seen: which end of its connection runs this hook.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Egress,
    Ingress,
}

/// The host's network namespace: "local" for packet programs means loopback
/// or one of the host's addresses (see `Config::host_netns_cookie`).
#[inline(always)]
fn host_netns() -> u64 {
    CONFIG.get(0).map(|c| c.host_netns_cookie).unwrap_or(0)
}

/// Live policy: (map slot, epoch), or None before any policy is loaded.
#[inline(always)]
fn live_policy() -> Option<(u8, u16)> {
    let c = CONFIG.get(0)?;
    (c.flags & CONFIG_FLAG_POLICY_LOADED != 0).then(|| (ztai_common::generation_slot(c.active_gen), c.active_gen as u16))
}

#[inline(always)]
fn config_flags() -> u32 {
    CONFIG.get(0).map(|c| c.flags).unwrap_or(0)
}

/// Handles a packet of a connection already in `CONNS`: counts it on the
/// counting side and, if the policy changed since the connection was judged,
/// judges it again — a connection the new policy denies is dropped
/// (revoked) and reported once. None if the connection is unknown.
#[inline(always)]
fn follow_known(ctx: &SkBuffContext, p: &Packet, side: Side) -> Option<i32> {
    // Travelling initiator → responder (orig) or back (reply)? One lookup
    // per direction tried, the entry's pointer kept.
    let (c, orig) = match CONNS.get_ptr_mut(&p.tuple) {
        Some(c) => (c, true),
        None => (CONNS.get_ptr_mut(&reversed(&p.tuple))?, false),
    };
    let mut conn = unsafe { *c };
    if side == Side::Ingress
        && orig
        && conn.receiver_cookie != 0
        && conn.receiver_cookie != unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    {
        // Same 4-tuple, another receiving socket: a new exchange.
        return None;
    }
    if side == Side::Ingress && !orig && conn.opening != 0 {
        // The initiator got an answer (SYN-ACK, or a RST when nothing
        // listens): its SYN is done, so its mark must not let a later SYN
        // reusing the 4-tuple from outside the subtree follow this entry.
        conn.opening = 0;
        unsafe { (*c).opening = 0 };
    }
    if let Some((slot, epoch)) = live_policy() {
        if conn.epoch != epoch {
            rejudge(ctx, p, side, orig, slot, epoch, &mut conn);
            unsafe { *c = conn };
        }
    }
    if conn.flow.verdict == VERDICT_DENY {
        count(ztai_common::COUNTER_REVOKED);
        return Some(DROP);
    }
    // This socket is the initiator when it sends orig or receives a reply;
    // only the end named by `counted_by` counts, so each packet counts once.
    let here = if (side == Side::Egress) == orig { COUNTED_BY_INITIATOR } else { COUNTED_BY_RESPONDER };
    if conn.counted_by == here {
        add(&conn.flow, orig, p.packets, p.bytes);
    }
    Some(PASS)
}

/// Judges an established connection under the live generation. This end's
/// segment is read again from its cgroup (it may have been relabeled); a
/// remote peer's from its address; a local peer keeps its recorded segment
/// (its own hooks judge its end).
#[inline(always)]
fn rejudge(ctx: &SkBuffContext, p: &Packet, side: Side, orig: bool, slot: u8, epoch: u16, conn: &mut Conn) {
    // This end is the initiator when it sends orig or receives a reply.
    let here_is_initiator = (side == Side::Egress) == orig;
    let peer_addr = if side == Side::Egress { p.tuple.daddr } else { p.tuple.saddr };
    let (here_segment, cgroup_id) = skb_segment(ctx, slot);
    let (mut src, mut dst) = (conn.flow.src, conn.flow.dst);
    let peer_segment = if crate::identity::is_local(host_netns(), &peer_addr) {
        if here_is_initiator { dst } else { src }
    } else {
        remote_segment(slot, &peer_addr)
    };
    if here_is_initiator {
        src = here_segment;
        dst = peer_segment;
    } else {
        src = peer_segment;
        dst = here_segment;
    }
    let v = decide(slot, src, dst, conn.flow.proto, conn.flow.dst_port);
    let was_denied = conn.flow.verdict == VERDICT_DENY;
    conn.epoch = epoch;
    conn.flow.src = src;
    conn.flow.dst = dst;
    conn.flow.verdict = v.verdict;
    if v.verdict != VERDICT_ALLOW && !was_denied {
        // Once per connection: later packets find it already judged.
        let (src_addr, src_port, dst_addr) = if orig {
            (p.tuple.saddr, p.tuple.sport, p.tuple.daddr)
        } else {
            (p.tuple.daddr, p.tuple.dport, p.tuple.saddr)
        };
        let reason = if v.verdict == VERDICT_DENY { ztai_common::REASON_REVOKED } else { v.reason };
        let flow = Flow {
            cgroup_id,
            sock_cookie: 0,
            src_segment: src,
            dst_segment: dst,
            src_addr,
            dst_addr,
            src_port,
            dst_port: conn.flow.dst_port,
            proto: conn.flow.proto,
            direction: if side == Side::Ingress { DIRECTION_INGRESS } else { ztai_common::DIRECTION_EGRESS },
            hook: if side == Side::Ingress { HOOK_SKB_INGRESS } else { ztai_common::HOOK_SKB_EGRESS },
        };
        report_without_task(&flow, v.verdict, reason);
    }
}

/// The flow connect/sendmsg authorized for this socket, if this packet
/// belongs to it (its destination is `peer`).
#[inline(always)]
fn authorized_flow(ctx: &SkBuffContext, peer: &Addr, peer_port: u16) -> Option<FlowKey> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let f = unsafe { SOCK_FLOWS.get(&cookie) }?;
    (f.dst_addr == *peer && f.dst_port == peer_port).then_some(*f)
}

/// Packets leaving a socket under the attach point. Verdicts for egress were
/// made at connect/sendmsg; this only counts, on the initiator's side.
pub fn egress(ctx: &SkBuffContext) -> i32 {
    let Parsed::Packet(p) = parse(ctx) else { return PASS };
    // A SYN is a connection connect() just judged: it replaces whatever an
    // older connection with the same 4-tuple left (below).
    if !p.opens {
        if let Some(verdict) = follow_known(ctx, &p, Side::Egress) {
            return verdict;
        }
    }
    // First packet of a connection this socket initiated.
    if let Some(flow) = authorized_flow(ctx, &p.tuple.daddr, p.tuple.dport) {
        let epoch = live_policy().map(|(_, e)| e).unwrap_or(0);
        let conn = Conn { flow, epoch, counted_by: COUNTED_BY_INITIATOR, opening: p.opens as u8, receiver_cookie: 0 };
        let _ = CONNS.insert(&p.tuple, &conn, 0);
        add(&flow, ORIG, p.packets, p.bytes);
    } else if p.opens {
        // Not authorized here (a socket older than the agent): at least no
        // older connection's entry may speak for it.
        let _ = CONNS.remove(&p.tuple);
    }
    // Otherwise: a socket older than the agent, or a reply whose connection
    // entry was evicted. Not counted rather than guessed.
    PASS
}

/// Whether this SYN's entry was made by its initiator's egress for this very
/// SYN (a local initiator under the attach point); consumes the mark, so a
/// later SYN reusing the 4-tuple from elsewhere cannot ride on it.
#[inline(always)]
fn syn_from_local_initiator(p: &Packet) -> bool {
    let Some(c) = CONNS.get_ptr_mut(&p.tuple) else { return false };
    unsafe {
        if (*c).counted_by == COUNTED_BY_INITIATOR && (*c).opening != 0 {
            (*c).opening = 0;
            return true;
        }
    }
    false
}

/// Segment of a packet's sender seen from the receiver: local addresses are
/// processes outside the attach point (those inside made a connection entry
/// at their egress), i.e. `host`; remote ones by address.
#[inline(always)]
fn sender_segment(generation: u8, saddr: &Addr) -> u32 {
    if is_always_local(saddr) {
        return SEGMENT_HOST;
    }
    let key = ztai_common::LocalAddrKey { netns_cookie: host_netns(), addr: *saddr };
    if unsafe { LOCAL_ADDRS.get(&key) }.is_some() {
        return SEGMENT_HOST;
    }
    remote_segment(generation, saddr)
}

/// Packets arriving at a socket under the attach point.
pub fn ingress(ctx: &SkBuffContext) -> i32 {
    let p = match parse(ctx) {
        Parsed::Packet(p) => p,
        Parsed::Other => return PASS,
        Parsed::Unparseable(tuple) => return judge_unparseable(ctx, tuple),
    };
    // A SYN follows an entry only when its own initiator's egress just made
    // it; else it is a new connection reusing an old 4-tuple, judged below.
    if !p.opens || syn_from_local_initiator(&p) {
        if let Some(verdict) = follow_known(ctx, &p, Side::Ingress) {
            return verdict;
        }
    }
    // A reply to a connection of ours whose entry was evicted: restore it
    // (judged under the generation its socket's flow was authorized in; the
    // next packet re-judges it if that has changed).
    if let Some(flow) = authorized_flow(ctx, &p.tuple.saddr, p.tuple.sport) {
        let conn = Conn { flow, epoch: 0, counted_by: COUNTED_BY_INITIATOR, opening: 0, receiver_cookie: 0 };
        let _ = CONNS.insert(&reversed(&p.tuple), &conn, 0);
        add(&flow, REPLY, p.packets, p.bytes);
        return PASS;
    }

    // A connection from outside the attach point: judge it here.
    let (generation, epoch, loaded) = match live_policy() {
        Some((slot, epoch)) => (slot, epoch, true),
        None => (0, 0, false),
    };
    let (dst, cgroup_id) = skb_segment(ctx, generation);
    let src = sender_segment(generation, &p.tuple.saddr);
    let v = if loaded {
        unless_labels_incomplete(decide(generation, src, dst, p.tuple.proto, p.tuple.dport), src, dst, config_flags())
    } else {
        Verdict { verdict: VERDICT_DENY, reason: ztai_common::REASON_NO_POLICY }
    };
    let flow = FlowKey {
        src,
        dst,
        dst_addr: p.tuple.daddr,
        dst_port: p.tuple.dport,
        proto: p.tuple.proto,
        verdict: v.verdict,
    };
    add(&flow, ORIG, p.packets, p.bytes);
    if v.verdict == VERDICT_ALLOW {
        count(COUNTER_ALLOWED);
    } else {
        report_ingress(&p, src, dst, cgroup_id, v.verdict, v.reason, true);
        if v.verdict == VERDICT_DENY {
            count(COUNTER_DENIED);
            count(COUNTER_INGRESS_DROPPED);
            // Dropping the SYN means the handshake never completes.
            return DROP;
        }
        count(COUNTER_AUDITED);
    }
    let receiver_cookie = if p.tuple.proto == PROTO_UDP { unsafe { bpf_get_socket_cookie(ctx.as_ptr()) } } else { 0 };
    let conn = Conn { flow, epoch, counted_by: COUNTED_BY_RESPONDER, opening: 0, receiver_cookie };
    let _ = CONNS.insert(&p.tuple, &conn, 0);
    PASS
}

/// `fold`: per flow (see `report_ingress_drop`); off where the packet's
/// addresses and ports are unknown, so distinct senders never fold together.
#[inline(always)]
fn report_ingress(p: &Packet, src: u32, dst: u32, cgroup_id: u64, verdict: u8, reason: u8, fold: bool) {
    let flow = Flow {
        cgroup_id,
        sock_cookie: 0,
        src_segment: src,
        dst_segment: dst,
        src_addr: p.tuple.saddr,
        dst_addr: p.tuple.daddr,
        src_port: p.tuple.sport,
        dst_port: p.tuple.dport,
        proto: p.tuple.proto,
        direction: DIRECTION_INGRESS,
        hook: HOOK_SKB_INGRESS,
    };
    if fold {
        report_ingress_drop(&p.tuple, &flow, verdict, reason);
    } else {
        report_without_task(&flow, verdict, reason);
    }
}

/// A protocol no rule names, or TCP/UDP we cannot read: a labeled receiver
/// drops it (fail closed).
#[inline(always)]
fn judge_unparseable(ctx: &SkBuffContext, tuple: TupleKey) -> i32 {
    let generation = live_policy().map(|(slot, _)| slot).unwrap_or(0);
    let (dst, cgroup_id) = skb_segment(ctx, generation);
    if dst == SEGMENT_HOST {
        return PASS;
    }
    // Addresses unread (a truncated header): no sender known, and no folding,
    // so distinct senders never fold together.
    let known = tuple.saddr != [0; 4];
    let src = if known { sender_segment(generation, &tuple.saddr) } else { ztai_common::SEGMENT_WORLD };
    let v = deny_or_audit(generation, src, dst, REASON_UNPARSEABLE);
    let p = Packet { tuple, bytes: ctx.len() as u64, packets: 1, opens: false };
    report_ingress(&p, src, dst, cgroup_id, v.verdict, v.reason, known);
    if v.verdict == VERDICT_AUDIT {
        count(COUNTER_AUDITED);
        return PASS;
    }
    count(COUNTER_DENIED);
    count(COUNTER_INGRESS_DROPPED);
    DROP
}
