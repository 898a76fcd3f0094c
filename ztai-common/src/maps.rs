//! Map names and sizes: the one place they are defined.
//!
//! Attribute positions in the eBPF crate need a literal, so names are produced
//! by the `map_name!` macro, and the `&str` constants the agent uses are made
//! from the same macro.

#[macro_export]
macro_rules! map_name {
    (CONFIG) => { "ZTAI_CONFIG" };
    (CGROUP_LABELS) => { "ZTAI_CGROUP_LABELS" };
    (SEGMENT_FLAGS) => { "ZTAI_SEGMENT_FLAGS" };
    (RULE_PAIRS) => { "ZTAI_RULE_PAIRS" };
    (RULE_PORTS) => { "ZTAI_RULE_PORTS" };
    (RULE_RANGES) => { "ZTAI_RULE_RANGES" };
    (CIDRS) => { "ZTAI_CIDRS" };
    (SOCKET_OWNERS) => { "ZTAI_SOCKET_OWNERS" };
    (SOCKET_KEYS) => { "ZTAI_SOCKET_KEYS" };
    (LOCAL_ADDRS) => { "ZTAI_LOCAL_ADDRS" };
    (UDP_EXCHANGES) => { "ZTAI_UDP_EXCHANGES" };
    (COUNTERS) => { "ZTAI_COUNTERS" };
    (CONNS) => { "ZTAI_CONNS" };
    (SOCK_FLOWS) => { "ZTAI_SOCK_FLOWS" };
    (FLOWS) => { "ZTAI_FLOWS" };
    (WORKLOAD_ADDRS) => { "ZTAI_WORKLOAD_ADDRS" };
    (EVENTS) => { "ZTAI_EVENTS" };
    (INGRESS_REPORTS) => { "ZTAI_INGRESS_REPORTS" };
}

pub const CONFIG: &str = map_name!(CONFIG);
pub const CGROUP_LABELS: &str = map_name!(CGROUP_LABELS);
pub const SEGMENT_FLAGS: &str = map_name!(SEGMENT_FLAGS);
pub const RULE_PAIRS: &str = map_name!(RULE_PAIRS);
pub const RULE_PORTS: &str = map_name!(RULE_PORTS);
pub const RULE_RANGES: &str = map_name!(RULE_RANGES);
pub const CIDRS: &str = map_name!(CIDRS);
pub const SOCKET_OWNERS: &str = map_name!(SOCKET_OWNERS);
/// Socket cookie → its `SOCKET_OWNERS` key: sock_release may not read a
/// socket's addresses, only its cookie.
pub const SOCKET_KEYS: &str = map_name!(SOCKET_KEYS);
pub const LOCAL_ADDRS: &str = map_name!(LOCAL_ADDRS);
pub const UDP_EXCHANGES: &str = map_name!(UDP_EXCHANGES);
pub const COUNTERS: &str = map_name!(COUNTERS);
/// Connections seen by the packet hooks (LRU), to count each packet once.
pub const CONNS: &str = map_name!(CONNS);
/// Socket cookie → the flow connect/sendmsg authorized for it.
pub const SOCK_FLOWS: &str = map_name!(SOCK_FLOWS);
/// Per-flow packet and byte counters (per-CPU LRU).
pub const FLOWS: &str = map_name!(FLOWS);
/// Addresses of labeled workloads living in their own network namespaces.
pub const WORKLOAD_ADDRS: &str = map_name!(WORKLOAD_ADDRS);
pub const EVENTS: &str = map_name!(EVENTS);
/// Last report of each dropped inbound flow (LRU), so repeated drops of one
/// flow fold into one event per window instead of filling the ring buffer.
pub const INGRESS_REPORTS: &str = map_name!(INGRESS_REPORTS);

/// Every map the agent expects in the object file.
pub const ALL: &[&str] = &[
    CONFIG, CGROUP_LABELS, SEGMENT_FLAGS, RULE_PAIRS, RULE_PORTS, RULE_RANGES, CIDRS,
    SOCKET_OWNERS, SOCKET_KEYS, LOCAL_ADDRS, UDP_EXCHANGES, COUNTERS, EVENTS, CONNS, SOCK_FLOWS, FLOWS, WORKLOAD_ADDRS,
    INGRESS_REPORTS,
];

pub const CGROUP_LABELS_MAX: u32 = 65_536;
/// Both generations' entries live at once during a switch.
pub const RULE_PAIRS_MAX: u32 = 131_072;
pub const RULE_PORTS_MAX: u32 = 262_144;
pub const RULE_RANGES_MAX: u32 = 262_144;
pub const CIDRS_MAX: u32 = 65_536;
pub const SOCKET_OWNERS_MAX: u32 = 65_536;
pub const LOCAL_ADDRS_MAX: u32 = 4_096;
pub const UDP_EXCHANGES_MAX: u32 = 65_536;
pub const CONNS_MAX: u32 = 262_144;
pub const SOCK_FLOWS_MAX: u32 = 131_072;
pub const FLOWS_MAX: u32 = 65_536;
pub const WORKLOAD_ADDRS_MAX: u32 = 16_384;
pub const INGRESS_REPORTS_MAX: u32 = 16_384;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_BYTES: u32 = 1 << 22;
/// How many cgroup levels the kernel climbs to find an unlabeled cgroup's segment.
pub const CGROUP_MAX_DEPTH: u32 = 32;
