//! Types that cross the kernel boundary between `ztai-ebpf` and `ztai-agent`.
//!
//! Every type here is `#[repr(C)]` with explicit padding fields (so no byte of a
//! map key is ever uninitialised) and no `bool`/`enum` fields (the kernel side
//! writes raw integers). Codes are plain integer constants for the same reason.
//! Addresses are always 16 bytes in network byte order; IPv4 is stored
//! IPv4-mapped (`::ffff:a.b.c.d`) so one key layout serves both families.
#![no_std]

pub mod maps;

/// Identity of a segment inside the kernel. `0` and `1` are built in.
pub type SegmentId = u32;
/// Any process not in a labeled cgroup.
pub const SEGMENT_HOST: SegmentId = 0;
/// Any address outside every `cidrs` segment.
pub const SEGMENT_WORLD: SegmentId = 1;
/// First id handed to a segment declared in a policy.
pub const SEGMENT_FIRST_DECLARED: SegmentId = 2;
/// Segment ids are `< MAX_SEGMENTS` (bounds the segment-flags array).
pub const MAX_SEGMENTS: u32 = 4096;

/// The two policy generations: entries carry one and `Config::active_gen` picks
/// which is live, so a new policy is written beside the old one and switched in
/// with a single array update.
pub const GENERATIONS: u32 = 2;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Verdict codes (`ViolationEvent::verdict`).
pub const VERDICT_ALLOW: u8 = 0;
pub const VERDICT_DENY: u8 = 1;
/// A would-be deny that passed because every labeled end is in audit mode.
pub const VERDICT_AUDIT: u8 = 2;

/// Why the kernel decided (`ViolationEvent::reason`).
pub const REASON_NO_RULE: u8 = 1;
/// The socket-owner table is full: a labeled socket could not be recorded.
pub const REASON_SOCKET_TABLE_FULL: u8 = 2;
/// The kernel handed the program an address family it does not know.
pub const REASON_UNKNOWN_FAMILY: u8 = 3;
/// The agent could not label every cgroup and asked the kernel to fail closed.
pub const REASON_LABELS_INCOMPLETE: u8 = 4;
/// No policy generation is active yet (agent still starting).
pub const REASON_NO_POLICY: u8 = 5;
/// An inbound packet ztai cannot judge: a protocol no rule can name (not
/// TCP, UDP or ICMP), or IPv6 whose transport header sits behind extension
/// headers. A labeled receiver drops it.
pub const REASON_UNPARSEABLE: u8 = 6;
/// An established connection no longer allowed after a reload or relabel.
pub const REASON_REVOKED: u8 = 7;

/// Which hook produced an event (`ViolationEvent::hook`).
pub const HOOK_CONNECT4: u8 = 1;
pub const HOOK_CONNECT6: u8 = 2;
pub const HOOK_SENDMSG4: u8 = 3;
pub const HOOK_SENDMSG6: u8 = 4;
pub const HOOK_POST_BIND4: u8 = 5;
pub const HOOK_POST_BIND6: u8 = 6;
pub const HOOK_SKB_INGRESS: u8 = 7;
pub const HOOK_SKB_EGRESS: u8 = 8;

pub const DIRECTION_EGRESS: u8 = 1;
pub const DIRECTION_INGRESS: u8 = 2;

/// Segment flag: would-be denials involving this segment pass and are reported.
pub const SEGMENT_FLAG_AUDIT: u32 = 1 << 0;
/// Segment flag: the segment is declared in the active policy.
pub const SEGMENT_FLAG_DECLARED: u32 = 1 << 1;

/// Config flag: the agent failed to label some cgroup, so unlabeled (host)
/// processes under the attach point are denied too, rather than risk a labeled
/// workload passing as `host`.
pub const CONFIG_FLAG_LABELS_INCOMPLETE: u32 = 1 << 0;
/// Config flag: a policy generation has been written and switched in.
pub const CONFIG_FLAG_POLICY_LOADED: u32 = 1 << 1;

/// Layout of the pinned maps: their key and value types and what each field
/// means. A restarted agent adopts pinned maps only when they carry its own
/// version (aya reuses a pinned map by name without comparing it to the
/// object's definition). Bump it with any change to a type stored in a map.
pub const LAYOUT_VERSION: u32 = 2;

/// Single-entry array value with global settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Number of the live policy generation (1, 2, … per applied policy).
    /// Its low bit is the map slot (`generation` byte of every key) whose
    /// rules, cidrs and labels are live.
    pub active_gen: u32,
    pub flags: u32,
    /// Cookie of the agent's (the host's) network namespace. Packet programs
    /// judge "is this address local?" against the host's addresses with it,
    /// since `bpf_get_netns_cookie` reaches cgroup_skb only in Linux 6.15.
    pub host_netns_cookie: u64,
    /// [`LAYOUT_VERSION`] of the agent that wrote this entry (0: never written).
    pub layout: u32,
    pub _pad: u32,
}

/// A segment per policy generation: the value of `maps::CGROUP_LABELS`
/// (keyed by cgroup id) and `maps::WORKLOAD_ADDRS`. A reload writes the new
/// generation's slot beside the live one, so relabeling switches atomically
/// with the rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLabel {
    pub segments: [SegmentId; GENERATIONS as usize],
}

impl CgroupLabel {
    pub const fn same(segment: SegmentId) -> Self {
        Self { segments: [segment; GENERATIONS as usize] }
    }

    #[inline(always)]
    pub fn segment(&self, generation: u8) -> SegmentId {
        self.segments[(generation & 1) as usize]
    }
}

/// Key of `maps::RULE_PAIRS`: is there any rule from `src` to `dst` on `proto`?
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub src: SegmentId,
    pub dst: SegmentId,
    pub generation: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// Pair value flag: some rule allows every port.
pub const PAIR_ANY_PORT: u32 = 1 << 0;
/// Pair value flag: `maps::RULE_PORTS` holds single ports for this pair.
pub const PAIR_HAS_PORTS: u32 = 1 << 1;
/// Pair value flag: `maps::RULE_RANGES` holds port ranges for this pair.
pub const PAIR_HAS_RANGES: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairValue {
    pub flags: u32,
    /// Index (in file order) of the first rule allowing every port, if `PAIR_ANY_PORT`.
    pub any_port_rule: u32,
}

/// Key of `maps::RULE_PORTS`: a single allowed destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub src: SegmentId,
    pub dst: SegmentId,
    pub generation: u8,
    pub proto: u8,
    /// Host byte order.
    pub port: u16,
}

/// Value of the rule maps: which rule (0-based, file order) allowed the flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleRef {
    pub rule: u32,
}

/// Data of a `maps::RULE_RANGES` LPM-trie key: `[generation, proto, src(BE32),
/// dst(BE32), port(BE16)]`. A port range is split into prefix blocks; the
/// prefix length counts the 80 fixed bits plus the block's port bits.
pub const RANGE_KEY_BYTES: usize = 12;
pub const RANGE_KEY_FIXED_BITS: u32 = 80;

#[inline(always)]
pub fn range_key_data(generation: u8, proto: u8, src: SegmentId, dst: SegmentId, port: u16) -> [u8; RANGE_KEY_BYTES] {
    let s = src.to_be_bytes();
    let d = dst.to_be_bytes();
    let p = port.to_be_bytes();
    [generation, proto, s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], p[0], p[1]]
}

/// Data of a `maps::CIDRS` LPM-trie key: `[generation, 0, 0, 0, addr(16, v4-mapped)]`.
/// The prefix length counts the 32 fixed bits plus the address prefix in its
/// 128-bit (mapped) form.
pub const CIDR_KEY_BYTES: usize = 20;
pub const CIDR_KEY_FIXED_BITS: u32 = 32;

#[inline(always)]
pub fn cidr_key_data(generation: u8, addr: &[u8; 16]) -> [u8; CIDR_KEY_BYTES] {
    let mut k = [0u8; CIDR_KEY_BYTES];
    k[0] = generation;
    let mut i = 0;
    while i < 16 {
        k[4 + i] = addr[i];
        i += 1;
    }
    k
}

/// Value of `maps::CIDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentRef {
    pub segment: SegmentId,
}

/// Key of `maps::SOCKET_OWNERS`: a bound socket as the kernel's socket lookup
/// reports it. A listener is identified by its owner's cgroup, never by its
/// port alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub netns_cookie: u64,
    /// Bound address, network byte order (IPv4 sockets: v4-mapped).
    pub addr: [u32; 4],
    /// Bound port, host byte order.
    pub port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketOwner {
    /// Cookie of the owning socket, so only its own release removes the entry.
    /// `0` for sockets found by the agent's procfs scan.
    pub sock_cookie: u64,
    pub cgroup_id: u64,
    pub segment: SegmentId,
    pub _pad: u32,
}

/// Key of `maps::LOCAL_ADDRS`: an address owned by this host in a network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalAddrKey {
    pub netns_cookie: u64,
    pub addr: [u32; 4],
}

/// Key of `maps::UDP_EXCHANGES`: a UDP server socket received a datagram from
/// `peer`, so its replies to `peer` belong to that exchange.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExchangeKey {
    pub sock_cookie: u64,
    pub peer_addr: [u32; 4],
    /// Host byte order.
    pub peer_port: u16,
    pub _pad: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeValue {
    /// `bpf_ktime_get_ns` of the last datagram received from the peer.
    pub last_seen_ns: u64,
}

/// A UDP exchange stays open for replies this long after the peer's last datagram.
pub const UDP_EXCHANGE_IDLE_NS: u64 = 120 * 1_000_000_000;

/// Indexes of `maps::COUNTERS` (per-CPU `u64`).
pub const COUNTER_ALLOWED: u32 = 0;
pub const COUNTER_DENIED: u32 = 1;
pub const COUNTER_AUDITED: u32 = 2;
/// Events lost because the ring buffer was full; the verdict was not delayed.
pub const COUNTER_EVENTS_DROPPED: u32 = 3;
pub const COUNTER_SOCKET_TABLE_FULL: u32 = 4;
pub const COUNTER_UDP_REPLIES: u32 = 5;
/// New entries made in `maps::FLOWS`; minus the live entries, the evictions.
pub const COUNTER_FLOWS_CREATED: u32 = 6;
pub const COUNTER_INGRESS_DROPPED: u32 = 7;
/// Packets of established connections dropped because a reload or a
/// relabel revoked them.
pub const COUNTER_REVOKED: u32 = 8;
/// Ingress drops not reported because they repeated their flow's report
/// within [`INGRESS_FOLD_WINDOW_NS`].
pub const COUNTER_REPORTS_FOLDED: u32 = 9;
pub const COUNTERS_LEN: u32 = 12;

/// A connection in initiator orientation: `s*` is the side that sent first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// What the metrics and the flow view count by: (source segment, destination
/// segment, destination address, destination port, protocol, verdict).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: SegmentId,
    pub dst: SegmentId,
    pub dst_addr: [u32; 4],
    /// Host byte order.
    pub dst_port: u16,
    pub proto: u8,
    pub verdict: u8,
}

/// `Conn::counted_by`: the initiator runs under the attach point, so its
/// egress and ingress count the connection; the responder's hooks skip it.
pub const COUNTED_BY_INITIATOR: u8 = 1;
/// The initiator is outside (remote, or a local process outside the attach
/// point): the responder's hooks count it.
pub const COUNTED_BY_RESPONDER: u8 = 2;

/// Value of `maps::CONNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Its verdict (`flow.verdict`) holds for policy generation `epoch`
    /// (low 16 bits of `Config::active_gen`); a packet seen under another
    /// generation is judged again (revocation).
    pub flow: FlowKey,
    pub epoch: u16,
    pub counted_by: u8,
    /// 1 from a local initiator's SYN (seen at its egress) until that SYN
    /// reaches a receiver under the attach point: only then may a SYN at
    /// ingress follow this entry. Any other SYN finding an entry is a new
    /// connection reusing an old 4-tuple and is judged afresh.
    pub opening: u8,
    /// UDP judged at the receiver: cookie of the socket it was judged for.
    /// A datagram of the same 4-tuple reaching another socket (the old one
    /// closed, another bound the port) is judged afresh. 0 otherwise.
    pub receiver_cookie: u64,
}

/// Map slot of a generation number.
#[inline(always)]
pub const fn generation_slot(active_gen: u32) -> u8 {
    (active_gen & 1) as u8
}

/// Per-CPU value of `maps::FLOWS`. "orig" is initiator → responder.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

/// One record on `maps::EVENTS`: a denied (or audited) connection or datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViolationEvent {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at the verdict.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub sock_cookie: u64,
    /// `bpf_get_current_pid_tgid`: tgid in the upper half.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid`: uid in the lower half.
    pub uid_gid: u64,
    pub src_segment: SegmentId,
    pub dst_segment: SegmentId,
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    /// Host byte order; `0` when not bound yet.
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub hook: u8,
    pub _pad: [u8; 3],
    /// Ingress: identical drops of this flow folded (not reported) since its
    /// previous event.
    pub folded: u32,
    pub comm: [u8; 16],
}

/// A dropped inbound flow (same addresses, ports and protocol) is reported
/// at most once per window: a dropped SYN returns as retransmissions and a
/// blocked UDP sender keeps sending, one verdict per packet.
pub const INGRESS_FOLD_WINDOW_NS: u64 = 60_000_000_000;

/// Value of `maps::INGRESS_REPORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressReport {
    /// `bpf_ktime_get_ns` of the flow's last reported drop.
    pub reported_ns: u64,
    /// Drops folded since then.
    pub folded: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), every field is an integer or integer array and
    // padding is explicit, so any bit pattern is valid.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for CgroupLabel {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for PairValue {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for RuleRef {}
    unsafe impl aya::Pod for SegmentRef {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for SocketOwner {}
    unsafe impl aya::Pod for LocalAddrKey {}
    unsafe impl aya::Pod for ExchangeKey {}
    unsafe impl aya::Pod for ExchangeValue {}
    unsafe impl aya::Pod for ViolationEvent {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Conn {}
    unsafe impl aya::Pod for FlowCounters {}
    unsafe impl aya::Pod for IngressReport {}
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use core::mem::size_of;

    // Sizes are part of the kernel ABI and of the pinned maps' layout: a
    // change here must be deliberate, and bump LAYOUT_VERSION.
    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(LAYOUT_VERSION, 2, "layout changed: update the sizes below too");
        assert_eq!(size_of::<Config>(), 24);
        assert_eq!(size_of::<CgroupLabel>(), 8);
        assert_eq!(size_of::<PairKey>(), 12);
        assert_eq!(size_of::<PairValue>(), 8);
        assert_eq!(size_of::<PortKey>(), 12);
        assert_eq!(size_of::<SocketKey>(), 8 + 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<SocketOwner>(), 24);
        assert_eq!(size_of::<LocalAddrKey>(), 24);
        assert_eq!(size_of::<ExchangeKey>(), 32);
        assert_eq!(size_of::<TupleKey>(), 40);
        assert_eq!(size_of::<FlowKey>(), 28);
        assert_eq!(size_of::<Conn>(), 40);
        assert_eq!(size_of::<FlowCounters>(), 32);
        assert_eq!(size_of::<IngressReport>(), 16);
        assert_eq!(size_of::<ViolationEvent>(), 8 * 5 + 4 * 2 + 16 * 2 + 2 * 2 + 5 + 3 + 4 + 16);
    }

    #[test]
    fn range_key_is_big_endian_so_lpm_prefixes_follow_port_bits() {
        let k = range_key_data(1, PROTO_TCP, 2, 3, 0x2328);
        assert_eq!(k, [1, 6, 0, 0, 0, 2, 0, 0, 0, 3, 0x23, 0x28]);
    }
}
