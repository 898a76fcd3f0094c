//! The only room that touches aya: load the embedded eBPF object, write the
//! compiled policy and labels into its maps, attach its programs.
mod addr;

use std::{collections::{BTreeMap, BTreeSet}, fs::File, net::IpAddr, path::{Path, PathBuf}};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{CgroupAttachMode, ProgramError, links::{FdLink, PinnedLink}},
};
use ztai_common::{
    CONFIG_FLAG_LABELS_INCOMPLETE, CONFIG_FLAG_POLICY_LOADED, CgroupLabel, Config, FlowCounters, FlowKey, LAYOUT_VERSION,
    LocalAddrKey,
    MAX_SEGMENTS, SegmentId, SocketKey, SocketOwner, maps as m,
};

pub use addr::{ip_from_words, words_from_ip};

/// A local address of one network namespace.
pub fn local_addr_key(netns_cookie: u64, ip: IpAddr) -> LocalAddrKey {
    LocalAddrKey { netns_cookie, addr: words_from_ip(ip) }
}
/// Kernel log forwarder writing into the process-wide `log` logger.
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

use crate::{discovery::sockets::BoundSocket, policy::compile::CompiledPolicy};

/// bpf_map_update_elem flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// The object ztai-agent's build.rs built from ztai-ebpf with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztai"));

/// Every program in the object, in the order they are attached.
pub const PROGRAMS: &[&str] = &[
    "ztai_post_bind4",
    "ztai_post_bind6",
    "ztai_sock_release",
    "ztai_recvmsg4",
    "ztai_recvmsg6",
    "ztai_connect4",
    "ztai_connect6",
    "ztai_sendmsg4",
    "ztai_sendmsg6",
    "ztai_skb_ingress",
    "ztai_skb_egress",
];

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed (needs root with CAP_BPF and a kernel with BTF, 5.14 or newer)")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("the kernel rejected program {name}")]
    ProgramLoad { name: &'static str, #[source] source: ProgramError },
    #[error("cannot open cgroup {path}")]
    OpenCgroup { path: PathBuf, #[source] source: std::io::Error },
    #[error("attaching {name} to {path} failed")]
    Attach { name: &'static str, path: PathBuf, #[source] source: ProgramError },
    #[error("link of {name} is not a bpf_link (kernel older than 5.7?)")]
    Link { name: &'static str, #[source] source: aya::programs::links::LinkError },
    #[error("another ztai-agent is using the pin folder {path}; stop it, or give this one its own --pin-dir")]
    PinDirBusy { path: PathBuf },
    #[error(
        "the pinned maps in {dir} {found}; this agent uses map layout {expected}, and adopting them would misread \
         their contents. `ztai-agent uninstall --pin-dir {pin_dir}` removes them (enforcement stops until an agent \
         attaches again)"
    )]
    IncompatiblePins { dir: PathBuf, pin_dir: PathBuf, found: String, expected: u32 },
    #[error("cannot pin or unpin {path}")]
    Pin { path: PathBuf, #[source] source: std::io::Error },
    #[error("map {map}: {op} failed")]
    Map { map: &'static str, op: &'static str, #[source] source: MapError },
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, op, source }
}

pub struct Datapath {
    ebpf: Ebpf,
    /// Where maps and links are pinned, so enforcement outlives the agent.
    pin_dir: Option<PathBuf>,
    /// Links attached by this agent, until pinned.
    links: Vec<(&'static str, FdLink)>,
    /// Links pinned by this agent (they stay attached when it exits).
    pinned: Vec<PinnedLink>,
    /// Exclusive lock on the pin folder: one agent per set of pinned maps.
    _pin_lock: Option<File>,
    /// Forwards the programs' aya-log records (rare fail-closed diagnostics)
    /// to our log. Must live as long as the programs: dropping it closes the
    /// log map the programs were loaded against.
    kernel_log: Option<KernelLog>,
    config: Config,
    local_addrs: BTreeSet<LocalAddrKey>,
    /// What `WORKLOAD_ADDRS` holds, so a sync writes only differences
    /// instead of reading the whole map back.
    workload_addrs: BTreeMap<[u32; 4], CgroupLabel>,
}

/// Refuses pinned maps written with another map layout, before aya reuses
/// them: it reopens a pinned map by name without comparing it to the object's
/// definition. The config entry carries the layout version; maps pinned
/// without a config entry are an unknown layout too.
fn check_pinned_layout(pin_dir: &Path) -> Result<(), DatapathError> {
    let maps = pin_dir.join("maps");
    let incompatible = |found: String| DatapathError::IncompatiblePins {
        dir: maps.clone(),
        pin_dir: pin_dir.to_path_buf(),
        found,
        expected: LAYOUT_VERSION,
    };
    let config_pin = maps.join(m::CONFIG);
    if !config_pin.exists() {
        let others = std::fs::read_dir(&maps).map(|d| d.flatten().count()).unwrap_or(0);
        return match others {
            0 => Ok(()),
            n => Err(incompatible(format!("hold {n} maps but no {} entry (an unknown layout)", m::CONFIG))),
        };
    }
    let info = MapInfo::from_pin(&config_pin).map_err(map_err(m::CONFIG, "read pinned map info"))?;
    let want = std::mem::size_of::<Config>() as u32;
    if info.value_size() != want {
        return Err(incompatible(format!(
            "have a {}-byte {} value where this agent's is {want} bytes",
            info.value_size(),
            m::CONFIG
        )));
    }
    let data = MapData::from_pin(&config_pin).map_err(map_err(m::CONFIG, "open pinned"))?;
    let map = Map::from_map_data(data).map_err(map_err(m::CONFIG, "open pinned"))?;
    let config: Config = Array::<_, Config>::try_from(map)
        .and_then(|a| a.get(&0, 0))
        .map_err(map_err(m::CONFIG, "read pinned"))?;
    let never_written = config.layout == 0 && config.flags & CONFIG_FLAG_POLICY_LOADED == 0;
    if never_written || config.layout == LAYOUT_VERSION {
        Ok(())
    } else {
        Err(incompatible(format!("were written with map layout {}", config.layout)))
    }
}

impl Datapath {
    /// Loads the object and every program into the kernel (the verifier runs
    /// here), attaching nothing yet. With `pin_dir`, maps are pinned under
    /// `<pin_dir>/maps`, and maps a previous agent pinned there are reused:
    /// labels, rules, connections and counters carry over.
    pub fn load(pin_dir: Option<&Path>, map_sizes: &[(&'static str, u32)]) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        for (name, size) in map_sizes {
            loader.map_max_entries(name, *size);
        }
        let pin_lock = match pin_dir {
            Some(dir) => Some(lock_pin_dir(dir)?),
            None => None,
        };
        let map_paths: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => {
                let maps = dir.join("maps");
                std::fs::create_dir_all(&maps).map_err(|source| DatapathError::Pin { path: maps.clone(), source })?;
                m::ALL.iter().map(|n| (*n, maps.join(n))).collect()
            }
            None => Vec::new(),
        };
        if let Some(dir) = pin_dir {
            check_pinned_layout(dir)?;
        }
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        // Before the programs load: they are verified against the log map.
        let kernel_log = match KernelLog::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                log::warn!(error = e.to_string(); "kernel-side log unavailable; fail-closed diagnostics will only show as counters and events");
                None
            }
        };
        for name in m::ALL {
            if ebpf.map(name).is_none() {
                return Err(DatapathError::MissingMap(static_name(name)));
            }
        }
        for &name in PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))?;
            let result = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSock(p) => p.load(),
                aya::programs::Program::CgroupSkb(p) => p.load(),
                _ => return Err(DatapathError::MissingProgram(name)),
            };
            result.map_err(|source| DatapathError::ProgramLoad { name, source })?;
        }
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            links: Vec::new(),
            pinned: Vec::new(),
            _pin_lock: pin_lock,
            kernel_log,
            config: Config::default(),
            local_addrs: BTreeSet::new(),
            workload_addrs: BTreeMap::new(),
        };
        // Adopted maps hold a previous agent's state: start from it.
        dp.config = dp.read_config()?;
        dp.local_addrs = dp.present_keys::<LocalAddrKey, u32>(m::LOCAL_ADDRS)?.into_iter().collect();
        dp.workload_addrs = dp.present_entries(m::WORKLOAD_ADDRS)?.into_iter().collect();
        Ok(dp)
    }

    fn read_config(&self) -> Result<Config, DatapathError> {
        let map = self.ebpf.map(m::CONFIG).ok_or(DatapathError::MissingMap(m::CONFIG))?;
        let arr: Array<_, Config> = Array::try_from(map).map_err(map_err(m::CONFIG, "open"))?;
        arr.get(&0, 0).map_err(map_err(m::CONFIG, "get"))
    }

    fn present_keys<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<Vec<K>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let h: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name, "open"))?;
        Ok(h.keys().filter_map(Result::ok).collect())
    }

    fn present_entries<K: aya::Pod, V: aya::Pod>(&self, name: &'static str) -> Result<Vec<(K, V)>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let h: HashMap<_, K, V> = HashMap::try_from(map).map_err(map_err(name, "open"))?;
        Ok(h.iter().filter_map(Result::ok).collect())
    }

    /// Generation number a previous agent left live in pinned maps.
    pub fn adopted_generation(&self) -> Option<u32> {
        (self.config.flags & CONFIG_FLAG_POLICY_LOADED != 0).then_some(self.config.active_gen)
    }

    /// Labels a previous agent left in pinned maps.
    pub fn adopted_labels(&self) -> Result<std::collections::HashMap<u64, CgroupLabel>, DatapathError> {
        Ok(self.present_entries(m::CGROUP_LABELS)?.into_iter().collect())
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf.map_mut(name).ok_or(DatapathError::MissingMap(name))
    }

    /// Writes a compiled policy's entries into its slot (`compiled.generation`).
    /// Nothing reads that slot until `switch_generation` makes it live. On
    /// error the caller retires what was written.
    pub fn write_policy(&mut self, compiled: &CompiledPolicy) -> Result<(), DatapathError> {
        let slot = compiled.generation as u32;
        {
            let mut flags: Array<_, u32> = Array::try_from(self.map_mut(m::SEGMENT_FLAGS)?).map_err(map_err(m::SEGMENT_FLAGS, "open"))?;
            for id in 0..MAX_SEGMENTS {
                // Ids absent from this policy are written too: 0 = enforce, undeclared.
                let f = compiled.segment_flags.get(id as usize).copied().unwrap_or(0);
                flags.set(slot * MAX_SEGMENTS + id, f, 0).map_err(map_err(m::SEGMENT_FLAGS, "set"))?;
            }
        }
        {
            let mut pairs: HashMap<_, ztai_common::PairKey, ztai_common::PairValue> =
                HashMap::try_from(self.map_mut(m::RULE_PAIRS)?).map_err(map_err(m::RULE_PAIRS, "open"))?;
            for (k, v) in &compiled.pairs {
                pairs.insert(k, v, 0).map_err(map_err(m::RULE_PAIRS, "insert"))?;
            }
        }
        {
            let mut ports: HashMap<_, ztai_common::PortKey, ztai_common::RuleRef> =
                HashMap::try_from(self.map_mut(m::RULE_PORTS)?).map_err(map_err(m::RULE_PORTS, "open"))?;
            for (k, v) in &compiled.ports {
                ports.insert(k, v, 0).map_err(map_err(m::RULE_PORTS, "insert"))?;
            }
        }
        {
            let mut ranges: LpmTrie<_, [u8; ztai_common::RANGE_KEY_BYTES], ztai_common::RuleRef> =
                LpmTrie::try_from(self.map_mut(m::RULE_RANGES)?).map_err(map_err(m::RULE_RANGES, "open"))?;
            for (prefix, data, v) in &compiled.ranges {
                ranges.insert(&Key::new(*prefix, *data), v, 0).map_err(map_err(m::RULE_RANGES, "insert"))?;
            }
        }
        {
            let mut cidrs: LpmTrie<_, [u8; ztai_common::CIDR_KEY_BYTES], ztai_common::SegmentRef> =
                LpmTrie::try_from(self.map_mut(m::CIDRS)?).map_err(map_err(m::CIDRS, "open"))?;
            for (prefix, data, v) in &compiled.cidrs {
                cidrs.insert(&Key::new(*prefix, *data), v, 0).map_err(map_err(m::CIDRS, "insert"))?;
            }
        }
        Ok(())
    }

    /// Records the host's network namespace for the packet programs.
    pub fn set_host_netns(&mut self, cookie: u64) -> Result<(), DatapathError> {
        self.config.host_netns_cookie = cookie;
        self.write_config()
    }

    /// Makes generation `number` live: one array update, so every program
    /// sees either the old policy or the new one, never a mix.
    pub fn switch_generation(&mut self, number: u32) -> Result<(), DatapathError> {
        self.config.active_gen = number;
        self.config.flags |= CONFIG_FLAG_POLICY_LOADED;
        self.write_config()
    }

    fn write_config(&mut self) -> Result<(), DatapathError> {
        self.config.layout = LAYOUT_VERSION;
        let config = self.config;
        let mut arr: Array<_, Config> = Array::try_from(self.map_mut(m::CONFIG)?).map_err(map_err(m::CONFIG, "open"))?;
        arr.set(0, config, 0).map_err(map_err(m::CONFIG, "set"))
    }

    /// Labels cgroups; returns the ids that could not be written. Any failure
    /// sets the kernel's fail-closed flag for unlabeled traffic, since one of
    /// those cgroups may be a labeled workload passing as `host`; a call
    /// without failures clears it. Callers pass every cgroup still unlabeled
    /// (failed ones are retried), so no failure means none is left.
    pub fn set_cgroup_labels(&mut self, labels: &[(u64, CgroupLabel)]) -> Result<Vec<u64>, DatapathError> {
        let mut failed = Vec::new();
        {
            let mut map: HashMap<_, u64, CgroupLabel> =
                HashMap::try_from(self.map_mut(m::CGROUP_LABELS)?).map_err(map_err(m::CGROUP_LABELS, "open"))?;
            for (id, label) in labels {
                if map.insert(id, label, 0).is_err() {
                    failed.push(*id);
                }
            }
        }
        let incomplete = !failed.is_empty();
        if incomplete != self.labels_incomplete() {
            self.config.flags ^= CONFIG_FLAG_LABELS_INCOMPLETE;
            self.write_config()?;
        }
        Ok(failed)
    }

    /// Whether the kernel currently fails closed for unlabeled traffic
    /// because some cgroup could not be labeled.
    pub fn labels_incomplete(&self) -> bool {
        self.config.flags & CONFIG_FLAG_LABELS_INCOMPLETE != 0
    }

    pub fn remove_cgroup_labels(&mut self, ids: &[u64]) -> Result<(), DatapathError> {
        let mut map: HashMap<_, u64, CgroupLabel> =
            HashMap::try_from(self.map_mut(m::CGROUP_LABELS)?).map_err(map_err(m::CGROUP_LABELS, "open"))?;
        for id in ids {
            match map.remove(id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(m::CGROUP_LABELS, "remove")(e)),
            }
        }
        Ok(())
    }

    /// Makes the kernel's set of local addresses (per network namespace)
    /// equal `wanted`.
    pub fn sync_local_addrs(&mut self, wanted: BTreeSet<LocalAddrKey>) -> Result<(), DatapathError> {
        let current = std::mem::take(&mut self.local_addrs);
        let mut map: HashMap<_, LocalAddrKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(m::LOCAL_ADDRS).ok_or(DatapathError::MissingMap(m::LOCAL_ADDRS))?)
                .map_err(map_err(m::LOCAL_ADDRS, "open"))?;
        for gone in current.difference(&wanted) {
            match map.remove(gone) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(m::LOCAL_ADDRS, "remove")(e)),
            }
        }
        for new in wanted.difference(&current) {
            map.insert(new, 1, 0).map_err(map_err(m::LOCAL_ADDRS, "insert"))?;
        }
        self.local_addrs = wanted;
        Ok(())
    }

    /// Live entries in the flow table (for the eviction estimate).
    pub fn flow_count(&self) -> usize {
        self.read_flows().map(|f| f.len()).unwrap_or(0)
    }

    /// Records owners of sockets bound before the programs were attached.
    /// Entries the kernel already made (with a socket cookie) are kept.
    pub fn record_existing_sockets(&mut self, netns_cookie: u64, sockets: &[BoundSocket]) -> Result<usize, DatapathError> {
        let mut map: HashMap<_, SocketKey, SocketOwner> =
            HashMap::try_from(self.map_mut(m::SOCKET_OWNERS)?).map_err(map_err(m::SOCKET_OWNERS, "open"))?;
        let mut recorded = 0;
        let mut keys = Vec::new();
        for s in sockets {
            let key = SocketKey {
                netns_cookie,
                addr: words_from_ip(s.local.ip()),
                port: s.local.port(),
                family: s.family as u8,
                proto: s.proto,
                _pad: 0,
            };
            let cookie = s.cookie.unwrap_or(0);
            let owner = SocketOwner { sock_cookie: cookie, cgroup_id: s.cgroup_id, segment: s.segment, _pad: 0 };
            match map.insert(key, owner, BPF_NOEXIST) {
                Ok(()) => {
                    recorded += 1;
                    if cookie != 0 {
                        keys.push((cookie, key));
                    }
                }
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(m::SOCKET_OWNERS, "insert")(e)),
            }
        }
        // Lets the socket's own release remove the entry, as for kernel-made ones.
        let mut by_cookie: HashMap<_, u64, SocketKey> =
            HashMap::try_from(self.map_mut(m::SOCKET_KEYS)?).map_err(map_err(m::SOCKET_KEYS, "open"))?;
        for (cookie, key) in keys {
            by_cookie.insert(cookie, key, 0).map_err(map_err(m::SOCKET_KEYS, "insert"))?;
        }
        Ok(recorded)
    }

    /// Seeds the connection table with connections established before the
    /// programs were attached, so their packets are counted on the right end
    /// and judged: each entry carries a stale generation, so the kernel judges
    /// it under the live policy on its next packet (and reports it if denied).
    pub fn seed_connections(&mut self, generation: u32, conns: &[crate::discovery::sockets::EstablishedConn]) -> Result<usize, DatapathError> {
        use ztai_common::{COUNTED_BY_INITIATOR, COUNTED_BY_RESPONDER, Conn, PROTO_TCP, SEGMENT_HOST, TupleKey};
        let mut map: HashMap<_, TupleKey, Conn> =
            HashMap::try_from(self.map_mut(m::CONNS)?).map_err(map_err(m::CONNS, "open"))?;
        let mut seeded = 0;
        for c in conns {
            let key = TupleKey {
                saddr: words_from_ip(c.initiator.ip()),
                daddr: words_from_ip(c.responder.ip()),
                sport: c.initiator.port(),
                dport: c.responder.port(),
                proto: PROTO_TCP,
                _pad: [0; 3],
            };
            let counted_by = if c.initiator_segment.is_some() { COUNTED_BY_INITIATOR } else { COUNTED_BY_RESPONDER };
            let conn = Conn {
                flow: FlowKey {
                    src: c.initiator_segment.unwrap_or(SEGMENT_HOST),
                    dst: c.responder_segment.unwrap_or(SEGMENT_HOST),
                    dst_addr: key.daddr,
                    dst_port: key.dport,
                    proto: PROTO_TCP,
                    verdict: ztai_common::VERDICT_ALLOW,
                },
                epoch: generation.wrapping_sub(1) as u16,
                counted_by,
                opening: 0,
                receiver_cookie: 0,
            };
            match map.insert(key, conn, BPF_NOEXIST) {
                Ok(()) => seeded += 1,
                Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(map_err(m::CONNS, "insert")(e)),
            }
        }
        Ok(seeded)
    }

    /// Attaches every program at `cgroup` as a bpf_link (aya does so on 5.7+).
    /// The kernel always attaches cgroup links in multi-attach mode and takes
    /// no flags for them (BPF_F_ALLOW_MULTI is EINVAL), so `Single` is the mode
    /// to pass; programs attached below cannot override ours, since the kernel
    /// runs every program on the path and any denial wins.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let file = File::open(cgroup).map_err(|source| DatapathError::OpenCgroup { path: cgroup.to_path_buf(), source })?;
        for &name in PROGRAMS {
            let prog = self.ebpf.program_mut(name).ok_or(DatapathError::MissingProgram(name))?;
            let attach_err = |source| DatapathError::Attach { name, path: cgroup.to_path_buf(), source };
            let link: FdLink = match prog {
                aya::programs::Program::CgroupSockAddr(p) => {
                    let id = p.attach(&file, CgroupAttachMode::Single).map_err(attach_err)?;
                    p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| DatapathError::Link { name, source: e })?
                }
                aya::programs::Program::CgroupSock(p) => {
                    let id = p.attach(&file, CgroupAttachMode::Single).map_err(attach_err)?;
                    p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| DatapathError::Link { name, source: e })?
                }
                aya::programs::Program::CgroupSkb(p) => {
                    let Some(attach_type) = *p.expected_attach_type() else {
                        return Err(DatapathError::MissingProgram(name));
                    };
                    let id = p.attach(&file, attach_type, CgroupAttachMode::Single).map_err(attach_err)?;
                    p.take_link(id).map_err(attach_err)?.try_into().map_err(|e| DatapathError::Link { name, source: e })?
                }
                _ => return Err(DatapathError::MissingProgram(name)),
            };
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Pins this agent's links under `<pin_dir>/links/g<generation>`: from
    /// here on they stay attached if the agent exits or is killed.
    pub fn pin_links(&mut self, generation: u32) -> Result<(), DatapathError> {
        let Some(dir) = self.pin_dir.clone() else { return Ok(()) };
        let links_dir = dir.join("links").join(format!("g{generation}"));
        std::fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Pin { path: links_dir.clone(), source })?;
        for (name, link) in std::mem::take(&mut self.links) {
            let path = links_dir.join(name);
            let pinned = link.pin(&path).map_err(|e| DatapathError::Pin { path: path.clone(), source: std::io::Error::other(e) })?;
            self.pinned.push(pinned);
        }
        Ok(())
    }

    /// Detaches links pinned by earlier agents (every links/ folder but
    /// ours). Called once our own links are attached and pinned, so labeled
    /// traffic is never without a program.
    pub fn release_previous_links(&mut self, generation: u32) -> Result<usize, DatapathError> {
        let Some(dir) = self.pin_dir.clone() else { return Ok(0) };
        let ours = format!("g{generation}");
        let mut released = 0;
        let links = dir.join("links");
        let Ok(entries) = std::fs::read_dir(&links) else { return Ok(0) };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy() == ours {
                continue;
            }
            released += unpin_links_in(&entry.path())?;
        }
        Ok(released)
    }

    /// Removes the rule and cidr entries of map slot `slot` (a generation no
    /// longer live, whose readers have finished).
    pub fn retire_slot(&mut self, slot: u8) -> Result<(), DatapathError> {
        fn gone(r: Result<(), MapError>) -> Result<(), MapError> {
            match r {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        }
        let mut pairs: HashMap<_, ztai_common::PairKey, ztai_common::PairValue> =
            HashMap::try_from(self.map_mut(m::RULE_PAIRS)?).map_err(map_err(m::RULE_PAIRS, "open"))?;
        let old: Vec<_> = pairs.keys().filter_map(Result::ok).filter(|k| k.generation == slot).collect();
        for k in &old {
            gone(pairs.remove(k)).map_err(map_err(m::RULE_PAIRS, "remove"))?;
        }
        let mut ports: HashMap<_, ztai_common::PortKey, ztai_common::RuleRef> =
            HashMap::try_from(self.map_mut(m::RULE_PORTS)?).map_err(map_err(m::RULE_PORTS, "open"))?;
        let old: Vec<_> = ports.keys().filter_map(Result::ok).filter(|k| k.generation == slot).collect();
        for k in &old {
            gone(ports.remove(k)).map_err(map_err(m::RULE_PORTS, "remove"))?;
        }
        let mut ranges: LpmTrie<_, [u8; ztai_common::RANGE_KEY_BYTES], ztai_common::RuleRef> =
            LpmTrie::try_from(self.map_mut(m::RULE_RANGES)?).map_err(map_err(m::RULE_RANGES, "open"))?;
        let old: Vec<_> = ranges.keys().filter_map(Result::ok).filter(|k| k.data()[0] == slot).collect();
        for k in &old {
            gone(ranges.remove(k)).map_err(map_err(m::RULE_RANGES, "remove"))?;
        }
        let mut cidrs: LpmTrie<_, [u8; ztai_common::CIDR_KEY_BYTES], ztai_common::SegmentRef> =
            LpmTrie::try_from(self.map_mut(m::CIDRS)?).map_err(map_err(m::CIDRS, "open"))?;
        let old: Vec<_> = cidrs.keys().filter_map(Result::ok).filter(|k| k.data()[0] == slot).collect();
        for k in &old {
            gone(cidrs.remove(k)).map_err(map_err(m::CIDRS, "remove"))?;
        }
        Ok(())
    }

    /// `--detach-on-exit`: detaches this agent's links and removes every pin
    /// under the pin directory.
    pub fn detach_and_unpin(mut self) -> Result<(), DatapathError> {
        for link in std::mem::take(&mut self.pinned) {
            // Unpinning returns the link; dropping it detaches.
            let _ = link.unpin();
        }
        self.links.clear();
        if let Some(dir) = self.pin_dir.clone() {
            drop(self);
            uninstall(&dir)?;
        }
        Ok(())
    }

    /// The kernel log's readiness fd, handed to the event loop, which calls
    /// `EbpfLogger::flush` when it is readable.
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = self.ebpf.take_map(m::EVENTS).ok_or(DatapathError::MissingMap(m::EVENTS))?;
        RingBuf::try_from(map).map_err(map_err(m::EVENTS, "open"))
    }

    /// Every live flow with its counters summed over CPUs.
    pub fn read_flows(&self) -> Result<Vec<(FlowKey, FlowCounters)>, DatapathError> {
        let map = self.ebpf.map(m::FLOWS).ok_or(DatapathError::MissingMap(m::FLOWS))?;
        let flows: PerCpuHashMap<_, FlowKey, FlowCounters> =
            PerCpuHashMap::try_from(map).map_err(map_err(m::FLOWS, "open"))?;
        let mut out = Vec::new();
        for entry in flows.iter() {
            // An entry evicted between the key walk and its lookup is just gone.
            let Ok((key, per_cpu)) = entry else { continue };
            let mut sum = FlowCounters::default();
            for c in per_cpu.iter() {
                sum.orig_packets += c.orig_packets;
                sum.orig_bytes += c.orig_bytes;
                sum.reply_packets += c.reply_packets;
                sum.reply_bytes += c.reply_bytes;
            }
            out.push((key, sum));
        }
        Ok(out)
    }

    /// Makes the kernel's workload-address map equal `wanted` (addresses of
    /// labeled workloads living in their own network namespaces).
    pub fn sync_workload_addrs(&mut self, wanted: &BTreeMap<IpAddr, SegmentId>) -> Result<(), DatapathError> {
        let want: BTreeMap<[u32; 4], CgroupLabel> =
            wanted.iter().map(|(ip, seg)| (words_from_ip(*ip), CgroupLabel::same(*seg))).collect();
        let (gone, changed) = map_diff(&self.workload_addrs, &want);
        if gone.is_empty() && changed.is_empty() {
            return Ok(());
        }
        let mut map: HashMap<_, [u32; 4], CgroupLabel> = HashMap::try_from(
            self.ebpf.map_mut(m::WORKLOAD_ADDRS).ok_or(DatapathError::MissingMap(m::WORKLOAD_ADDRS))?,
        )
        .map_err(map_err(m::WORKLOAD_ADDRS, "open"))?;
        // The mirror follows each write, so after an error it still says
        // what the map holds and the next sync retries the rest.
        for k in gone {
            match map.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(m::WORKLOAD_ADDRS, "remove")(e)),
            }
            self.workload_addrs.remove(&k);
        }
        for (k, label) in changed {
            map.insert(k, label, 0).map_err(map_err(m::WORKLOAD_ADDRS, "insert"))?;
            self.workload_addrs.insert(k, label);
        }
        Ok(())
    }

    /// Sum over CPUs of one `COUNTER_*`.
    pub fn counter(&self, index: u32) -> Result<u64, DatapathError> {
        let map = self.ebpf.map(m::COUNTERS).ok_or(DatapathError::MissingMap(m::COUNTERS))?;
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err(m::COUNTERS, "open"))?;
        let values = arr.get(&index, 0).map_err(map_err(m::COUNTERS, "get"))?;
        Ok(values.iter().sum())
    }
}

/// Keys to remove and entries to (over)write to turn `current` into `wanted`.
fn map_diff<K: Ord + Copy, V: PartialEq + Copy>(current: &BTreeMap<K, V>, wanted: &BTreeMap<K, V>) -> (Vec<K>, Vec<(K, V)>) {
    let gone = current.keys().filter(|k| !wanted.contains_key(*k)).copied().collect();
    let changed = wanted.iter().filter(|(k, v)| current.get(*k) != Some(*v)).map(|(k, v)| (*k, *v)).collect();
    (gone, changed)
}

/// `NAME=N` → a map of ours and its new size (for small-scale tests of the
/// map-full paths, or nodes that need bigger tables).
pub fn parse_map_size(s: &str) -> Result<(&'static str, u32), String> {
    let (name, n) = s.split_once('=').ok_or_else(|| format!("expected NAME=ENTRIES, got {s:?}"))?;
    let name = m::ALL
        .iter()
        .find(|m| m.eq_ignore_ascii_case(name))
        .ok_or_else(|| format!("no map named {name}; maps: {}", m::ALL.join(", ")))?;
    if *name == m::CONFIG || *name == m::SEGMENT_FLAGS || *name == m::COUNTERS || *name == m::EVENTS {
        return Err(format!("{name} has a fixed size"));
    }
    let n: u32 = n.parse().map_err(|e| format!("bad size {n:?}: {e}"))?;
    if n == 0 {
        return Err("a map needs at least one entry".into());
    }
    Ok((name, n))
}

fn static_name(name: &str) -> &'static str {
    m::ALL.iter().find(|n| **n == name).copied().unwrap_or("unknown")
}

/// Detaches and unpins every link pinned in `dir`; removes `dir`.
fn unpin_links_in(dir: &Path) -> Result<usize, DatapathError> {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            match PinnedLink::from_pin(&path) {
                // Unpin, then drop: the link detaches.
                Ok(link) => {
                    link.unpin().map_err(|source| DatapathError::Pin { path: path.clone(), source })?;
                    n += 1;
                }
                Err(_) => std::fs::remove_file(&path).map_err(|source| DatapathError::Pin { path: path.clone(), source })?,
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(n),
        Err(source) => Err(DatapathError::Pin { path: dir.to_path_buf(), source }),
    }
}

/// What `uninstall` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Uninstalled {
    pub links: usize,
    pub maps: usize,
}

/// Removes every link, map and pin ztai made under `pin_dir`, and nothing
/// else: only the names this agent creates (links/g*/…, maps/<its map names>).
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, DatapathError> {
    let mut done = Uninstalled::default();
    if let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with('g') {
                done.links += unpin_links_in(&entry.path())?;
            }
        }
    }
    let _ = std::fs::remove_dir(pin_dir.join("links"));
    for name in m::ALL {
        let path = pin_dir.join("maps").join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => done.maps += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DatapathError::Pin { path, source }),
        }
    }
    for dir in [pin_dir.join("maps"), pin_dir.to_path_buf()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DatapathError::Pin { path: dir, source }),
        }
    }
    Ok(done)
}

/// Locks `dir` (created if needed) for this process; released on exit.
fn lock_pin_dir(dir: &Path) -> Result<File, DatapathError> {
    use std::os::fd::AsRawFd as _;
    std::fs::create_dir_all(dir).map_err(|source| DatapathError::Pin { path: dir.to_path_buf(), source })?;
    let f = File::open(dir).map_err(|source| DatapathError::Pin { path: dir.to_path_buf(), source })?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DatapathError::PinDirBusy { path: dir.to_path_buf() });
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_writes_only_what_differs() {
        let current: BTreeMap<u8, u32> = [(1, 10), (2, 20), (3, 30)].into_iter().collect();
        let wanted: BTreeMap<u8, u32> = [(2, 20), (3, 31), (4, 40)].into_iter().collect();
        assert_eq!(map_diff(&current, &wanted), (vec![1], vec![(3, 31), (4, 40)]));
        assert_eq!(map_diff(&wanted, &wanted), (vec![], vec![]));
        assert_eq!(map_diff(&BTreeMap::new(), &wanted).1.len(), 3);
    }
}
