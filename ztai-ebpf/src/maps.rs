//! Map definitions. Names come from `ztai_common::map_name!`, the one source
//! the agent also uses.
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf};
use ztai_common::{
    CIDR_KEY_BYTES, CgroupLabel, Config, Conn, FlowCounters, FlowKey, TupleKey, ExchangeKey, ExchangeValue, GENERATIONS,
    IngressReport, LocalAddrKey,
    MAX_SEGMENTS, PairKey, PairValue, PortKey, RANGE_KEY_BYTES, RuleRef, SegmentRef, SocketKey,
    SocketOwner, map_name, maps as m,
};

macro_rules! bpf_map {
    ($name:ident: $ty:ty = $init:expr) => {
        #[unsafe(link_section = "maps")]
        #[unsafe(export_name = map_name!($name))]
        pub static $name: $ty = $init;
    };
}

bpf_map!(CONFIG: Array<Config> = Array::with_max_entries(1, 0));
bpf_map!(CGROUP_LABELS: HashMap<u64, CgroupLabel> = HashMap::with_max_entries(m::CGROUP_LABELS_MAX, 0));
bpf_map!(SEGMENT_FLAGS: Array<u32> = Array::with_max_entries(MAX_SEGMENTS * GENERATIONS, 0));
bpf_map!(RULE_PAIRS: HashMap<PairKey, PairValue> = HashMap::with_max_entries(m::RULE_PAIRS_MAX, 0));
bpf_map!(RULE_PORTS: HashMap<PortKey, RuleRef> = HashMap::with_max_entries(m::RULE_PORTS_MAX, 0));
bpf_map!(RULE_RANGES: LpmTrie<[u8; RANGE_KEY_BYTES], RuleRef> = LpmTrie::with_max_entries(m::RULE_RANGES_MAX, 0));
bpf_map!(CIDRS: LpmTrie<[u8; CIDR_KEY_BYTES], SegmentRef> = LpmTrie::with_max_entries(m::CIDRS_MAX, 0));
bpf_map!(SOCKET_OWNERS: HashMap<SocketKey, SocketOwner> = HashMap::with_max_entries(m::SOCKET_OWNERS_MAX, 0));
bpf_map!(SOCKET_KEYS: HashMap<u64, SocketKey> = HashMap::with_max_entries(m::SOCKET_OWNERS_MAX, 0));
bpf_map!(LOCAL_ADDRS: HashMap<LocalAddrKey, u32> = HashMap::with_max_entries(m::LOCAL_ADDRS_MAX, 0));
bpf_map!(UDP_EXCHANGES: LruHashMap<ExchangeKey, ExchangeValue> = LruHashMap::with_max_entries(m::UDP_EXCHANGES_MAX, 0));
bpf_map!(COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ztai_common::COUNTERS_LEN, 0));
bpf_map!(EVENTS: RingBuf = RingBuf::with_byte_size(m::EVENTS_BYTES, 0));
bpf_map!(CONNS: LruHashMap<TupleKey, Conn> = LruHashMap::with_max_entries(m::CONNS_MAX, 0));
bpf_map!(SOCK_FLOWS: LruHashMap<u64, FlowKey> = LruHashMap::with_max_entries(m::SOCK_FLOWS_MAX, 0));
bpf_map!(FLOWS: LruPerCpuHashMap<FlowKey, FlowCounters> = LruPerCpuHashMap::with_max_entries(m::FLOWS_MAX, 0));
bpf_map!(WORKLOAD_ADDRS: HashMap<[u32; 4], CgroupLabel> = HashMap::with_max_entries(m::WORKLOAD_ADDRS_MAX, 0));
bpf_map!(INGRESS_REPORTS: LruHashMap<TupleKey, IngressReport> = LruHashMap::with_max_entries(m::INGRESS_REPORTS_MAX, 0));
