//! The event loop: set up the datapath, keep labels and local addresses in
//! step with the node, turn kernel events into reports, clean up on signals.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use log::{error, info, warn};
use tokio::{io::unix::AsyncFd, signal::unix::{SignalKind, signal}};
use ztai_common::SegmentId;

use tokio::sync::watch;

use ztai_common::CgroupLabel;

use crate::{
    datapath::{Datapath, DatapathError, local_addr_key},
    flows::{Snapshot, Totals, records},
    metrics::{self, MetricsError, MetricsState},
    discovery::{
        capabilities::{self, Capabilities, CapabilityError, Cost},
        cgroup_watch::CgroupWatcher,
        cgroups::{self, CgroupError, CgroupRoot, LabeledCgroup},
        local_addrs::{self, AddressEvents},
        policy_file::PolicyFileWatcher,
        kernel::KernelSupport,
        sockets, workloads,
    },
    policy::{Checked, Policy, compile::compile},
    report::{self, NameTable},
};

/// A validated, typed configuration: everything is checked before the
/// kernel is touched.
pub struct RunConfig {
    pub policy_path: PathBuf,
    pub policy: Checked,
    pub cgroup_root: CgroupRoot,
    /// How often new cgroups are looked for. The kernel already gives a new
    /// cgroup its nearest labeled ancestor's segment; this catches cgroups
    /// that match a selector of their own.
    pub rescan_every: Duration,
    pub services: Services,
    /// bpffs folder for pinned maps and links; None = nothing outlives the agent.
    pub pin_dir: Option<PathBuf>,
    /// On SIGTERM/SIGINT, detach and unpin everything instead of leaving
    /// enforcement in place for the next agent to adopt.
    pub detach_on_exit: bool,
    /// Map size overrides (`--map-size`).
    pub map_sizes: Vec<(&'static str, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("{0}")]
    Policy(String),
    #[error(transparent)]
    Kernel(#[from] crate::discovery::kernel::KernelError),
    #[error(transparent)]
    Capability(#[from] CapabilityError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("{what}")]
    Io { what: String, #[source] source: std::io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Io { what, source }
}

/// bpffs must be mounted for pinning; mount it where it usually lives if not.
fn ensure_bpffs() -> Result<(), RuntimeError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(io_err("cannot read /proc/self/mountinfo"))?;
    let mounted = mountinfo.lines().any(|l| {
        l.split_once(" - ").is_some_and(|(left, right)| {
            right.starts_with("bpf ") && left.split_whitespace().nth(4) == Some("/sys/fs/bpf")
        })
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(io_err("cannot create /sys/fs/bpf"))?;
    let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(RuntimeError::Io { what: "cannot mount bpffs at /sys/fs/bpf".into(), source: std::io::Error::last_os_error() });
    }
    info!(path = "/sys/fs/bpf"; "mounted bpffs");
    Ok(())
}

/// Warns once for each capability whose absence makes the agent see less
/// (it still enforces, so nothing else would tell), and returns every such
/// capability with whether it is missing, for the metric.
fn report_missing_capabilities(held: &Capabilities) -> Vec<(&'static str, bool)> {
    capabilities::NEEDED
        .iter()
        .filter(|need| need.cost == Cost::SeesLess)
        .map(|need| {
            let missing = !held.has(need);
            if missing {
                warn!(capability = need.name, consequence = need.consequence; "capability missing: enforcing, but not seeing every workload");
            }
            (need.name, missing)
        })
        .collect()
}

fn register<T: std::os::fd::AsRawFd>(inner: T, what: &str) -> Result<AsyncFd<T>, RuntimeError> {
    // SAFETY: `inner` owns its fd and the AsyncFd owns `inner`, so the fd
    // stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }.map_err(|e| RuntimeError::Io { what: what.into(), source: e.into() })
}


/// This host's addresses and those of labeled workloads in their own
/// network namespaces, as the kernel needs them.
struct NodeAddresses {
    netns_cookie: u64,
    host: std::collections::BTreeSet<std::net::IpAddr>,
    workloads: Vec<workloads::WorkloadNetns>,
    /// `host` and `workloads` as last written to the kernel: the tick
    /// rewrites nothing, and warns of nothing again, while they stay the same.
    applied: Option<(std::collections::BTreeSet<std::net::IpAddr>, Vec<workloads::WorkloadNetns>)>,
}

impl NodeAddresses {
    fn refresh_workloads(&mut self, root: &CgroupRoot, scanned: &[LabeledCgroup]) {
        self.workloads = workloads::scan(&root.mount, scanned);
    }

    fn is_applied(&self) -> bool {
        self.applied.as_ref().is_some_and(|(host, workloads)| *host == self.host && *workloads == self.workloads)
    }

    fn apply(&mut self, datapath: &mut Datapath) -> Result<(), RuntimeError> {
        if self.is_applied() {
            return Ok(());
        }
        let mut local: std::collections::BTreeSet<_> =
            self.host.iter().map(|ip| local_addr_key(self.netns_cookie, *ip)).collect();
        for ns in &self.workloads {
            local.extend(ns.addrs.iter().map(|ip| local_addr_key(ns.cookie, *ip)));
        }
        datapath.sync_local_addrs(local)?;
        let (by_addr, conflicts) = workloads::address_segments(&self.workloads);
        for ip in conflicts {
            warn!(addr = ip.to_string(); "address belongs to workloads of several segments; it identifies none of them");
        }
        datapath.sync_workload_addrs(&by_addr)?;
        // Only once written: a failed write is retried on the next call.
        self.applied = Some((self.host.clone(), self.workloads.clone()));
        Ok(())
    }
}

/// Where the agent serves what it knows.
#[derive(Debug, Clone)]
pub struct Services {
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub control_socket: Option<PathBuf>,
}

/// Kernel ids of declared segments, stable by name for the agent's lifetime:
/// labels and socket owners hold ids, so a reload must not renumber them.
#[derive(Debug)]
struct SegmentIds {
    by_name: HashMap<String, SegmentId>,
    next: SegmentId,
}

impl SegmentIds {
    fn new() -> Self {
        Self { by_name: HashMap::new(), next: ztai_common::SEGMENT_FIRST_DECLARED }
    }

    /// Renumbers `policy` in place; fails (changing nothing) if the kernel's
    /// segment table would overflow.
    fn assign(&mut self, policy: &mut Policy) -> Result<(), String> {
        let fresh = policy.segments.iter().filter(|s| !self.by_name.contains_key(&s.name)).count() as u32;
        if self.next + fresh > ztai_common::MAX_SEGMENTS {
            return Err(format!(
                "this policy would need segment ids beyond the kernel's table of {} (ids are kept stable across reloads; restart the agent to compact them)",
                ztai_common::MAX_SEGMENTS
            ));
        }
        policy.renumber(&mut |name| {
            *self.by_name.entry(name.to_string()).or_insert_with(|| {
                let id = self.next;
                self.next += 1;
                id
            })
        });
        Ok(())
    }
}

/// What each cgroup is labeled with in the kernel (one segment per slot).
struct Labels {
    current: HashMap<u64, CgroupLabel>,
    slot: u8,
    /// Cgroups the kernel map refused (full); each made unlabeled traffic fail closed.
    failures: u64,
}

impl Labels {
    /// Writes the labels `scanned` asks for. With `reload_slot`, only that
    /// (not yet live) slot changes, so the switch to it stays atomic;
    /// otherwise both slots get the live segment.
    fn apply(
        &mut self,
        datapath: &mut Datapath,
        policy: &Policy,
        scanned: &[LabeledCgroup],
        reload_slot: Option<u8>,
    ) -> Result<bool, RuntimeError> {
        let mut changed = Vec::new();
        let mut relabeled = false;
        for c in scanned {
            let want = match (reload_slot, self.current.get(&c.id)) {
                (Some(slot), Some(cur)) => {
                    let mut l = *cur;
                    l.segments[(slot & 1) as usize] = c.segment;
                    l
                }
                _ => CgroupLabel::same(c.segment),
            };
            if let Some(cur) = self.current.get(&c.id) {
                relabeled |= reload_slot.is_none() && cur.segment(self.slot) != c.segment;
            }
            if self.current.get(&c.id) != Some(&want) {
                if !c.also_matched.is_empty() && self.current.get(&c.id).map(|l| l.segment(self.slot)) != Some(c.segment) {
                    let others: Vec<&str> = c.also_matched.iter().map(|id| policy.segment_name(*id)).collect();
                    warn!(cgroup = format!("/{}", c.rel_path), segment = policy.segment_name(c.segment), also = others.join(","); "cgroup matches several segments; using the first in file order");
                }
                changed.push((c.id, want));
            }
        }
        let seen: std::collections::HashSet<u64> = scanned.iter().map(|c| c.id).collect();
        let gone: Vec<u64> = self.current.keys().filter(|id| !seen.contains(id)).copied().collect();
        // Removed first: the room they free may be what a failed label needs.
        if !gone.is_empty() {
            datapath.remove_cgroup_labels(&gone)?;
            for id in gone {
                self.current.remove(&id);
            }
        }
        let was_incomplete = datapath.labels_incomplete();
        let failed = datapath.set_cgroup_labels(&changed)?;
        for id in &failed {
            error!(cgroup_id = *id; "cannot label cgroup (map full?); unlabeled traffic under the attach point now fails closed");
        }
        if was_incomplete && failed.is_empty() {
            info!("every cgroup is labeled again; unlabeled traffic under the attach point no longer fails closed");
        }
        self.failures += failed.len() as u64;
        for (id, label) in changed.iter().filter(|(id, _)| !failed.contains(id)) {
            self.current.insert(*id, *label);
        }
        Ok(relabeled)
    }

    fn labeled_count(&self) -> usize {
        self.current.values().filter(|l| l.segment(self.slot) >= ztai_common::SEGMENT_FIRST_DECLARED).count()
    }
}

/// The agent's whole view of what it enforces.
struct Enforcer {
    datapath: Datapath,
    root: CgroupRoot,
    policy_path: PathBuf,
    policy: Policy,
    /// Text of the applied policy: a file event with the same text is no change.
    policy_text: String,
    /// Last rejected text, so a rejected file is reported once, not per event.
    rejected_text: String,
    ids: SegmentIds,
    /// Number of the live generation (1 for the first policy; an agent that
    /// adopts pinned state continues the numbering).
    generation: u32,
    /// Slot of the previous generation, emptied one tick after the switch
    /// so no program still reading it finds entries gone.
    retiring: Option<u8>,
    /// A previous agent's generation this one took over, if any.
    adopted: Option<u32>,
    labels: Labels,
    /// The live policy's selectors, with each cgroup's answer remembered.
    matcher: cgroups::SegmentMatcher,
    names: NameTable,
    misses: CgroupMisses,
    node: NodeAddresses,
    reload_errors: u64,
}

fn slot_of(generation: u32) -> u8 {
    ztai_common::generation_slot(generation)
}

impl Enforcer {
    fn start(datapath: Datapath, root: CgroupRoot, policy_path: PathBuf, mut policy: Policy, netns_cookie: u64) -> Result<Self, RuntimeError> {
        let policy_text = std::fs::read_to_string(&policy_path).unwrap_or_default();
        let mut ids = SegmentIds::new();
        ids.assign(&mut policy).map_err(RuntimeError::Policy)?;
        // Pinned maps of a previous agent: its generation stays live until
        // ours is written beside it and switched in, like a reload.
        let adopted = datapath.adopted_generation();
        let generation = adopted.map_or(1, |g| g + 1);
        let policy_for_matcher = policy.clone();
        let host = local_addrs::host_addresses().map_err(io_err("cannot list this host's addresses"))?;
        let current = if adopted.is_some() { datapath.adopted_labels()? } else { HashMap::new() };
        let mut e = Self {
            datapath,
            root,
            policy_path,
            policy,
            policy_text,
            rejected_text: String::new(),
            ids,
            generation,
            retiring: adopted.map(slot_of),
            adopted,
            labels: Labels { current, slot: slot_of(adopted.unwrap_or(generation)), failures: 0 },
            matcher: cgroups::SegmentMatcher::new(&policy_for_matcher),
            names: NameTable::default(),
            misses: CgroupMisses::default(),
            node: NodeAddresses { netns_cookie, host, workloads: Vec::new(), applied: None },
            reload_errors: 0,
        };
        e.datapath.set_host_netns(netns_cookie)?;
        if adopted.is_some() {
            // Leftovers of the generation before the adopted one.
            e.datapath.retire_slot(slot_of(generation))?;
        }
        let compiled = compile(&e.policy, slot_of(generation));
        e.datapath.write_policy(&compiled)?;
        let scanned = cgroups::scan_with(&e.root, &mut e.matcher)?;
        let reload_slot = adopted.map(|_| slot_of(generation));
        let _ = e.labels.apply(&mut e.datapath, &e.policy, &scanned, reload_slot)?;
        e.datapath.switch_generation(generation)?;
        e.labels.slot = slot_of(generation);
        e.node.refresh_workloads(&e.root, &scanned);
        e.node.apply(&mut e.datapath)?;
        e.set_names(&scanned);
        Ok(e)
    }

    fn scan(&mut self) -> Result<Vec<LabeledCgroup>, RuntimeError> {
        Ok(cgroups::scan_with(&self.root, &mut self.matcher)?)
    }

    /// Names from a full scan; ids earlier scans missed get another chance.
    fn set_names(&mut self, scanned: &[LabeledCgroup]) {
        self.names = names_for(&self.ids, scanned);
        self.misses.clear();
    }

    /// Learns the path of an event's cgroup newer than the last scan.
    fn name_cgroup(&mut self, id: u64) {
        let Self { misses, names, root, matcher, ids, .. } = self;
        misses.resolve(id, names, || cgroups::scan_with(root, matcher).ok().map(|fresh| names_for(ids, &fresh)));
    }

    /// Labels new cgroups, forgets removed ones.
    fn relabel(&mut self) -> Result<(), RuntimeError> {
        match self.scan() {
            Ok(scanned) => {
                let relabeled = self.labels.apply(&mut self.datapath, &self.policy, &scanned, None)?;
                self.set_names(&scanned);
                if relabeled {
                    self.revalidate_connections()?;
                }
            }
            Err(e) => error!(error = format!("{e:#}"); "cgroup rescan failed"),
        }
        Ok(())
    }

    /// A workload changed segment without a policy change: apply the same
    /// policy as a new generation, so the kernel judges every established
    /// connection again on its next packet. (cgroup v2 forbids renaming
    /// cgroups, so today only a reload relabels; this keeps the guarantee if
    /// labeling ever gains another input.)
    fn revalidate_connections(&mut self) -> Result<(), RuntimeError> {
        self.policy_text.clear();
        self.reload("relabel")
    }

    /// The periodic pass: relabel, workload addresses, retire the previous
    /// generation's entries.
    fn tick(&mut self) -> Result<(), RuntimeError> {
        if let Some(slot) = self.retiring.take() {
            self.datapath.retire_slot(slot)?;
        }
        match self.scan() {
            Ok(scanned) => {
                let relabeled = self.labels.apply(&mut self.datapath, &self.policy, &scanned, None)?;
                self.node.refresh_workloads(&self.root, &scanned);
                self.node.apply(&mut self.datapath)?;
                self.set_names(&scanned);
                if relabeled {
                    self.revalidate_connections()?;
                }
            }
            Err(e) => error!(error = format!("{e:#}"); "cgroup rescan failed"),
        }
        Ok(())
    }

    /// Validates and compiles the policy file, writes it beside the live
    /// generation, then switches with one update. An invalid file, or entries
    /// the kernel refuses, leave the live policy untouched.
    fn reload(&mut self, trigger: &str) -> Result<(), RuntimeError> {
        let text = match std::fs::read_to_string(&self.policy_path) {
            Ok(t) => t,
            Err(e) => {
                self.reload_errors += 1;
                error!(trigger = trigger, policy = self.policy_path.display().to_string(), error = e.to_string(); "policy reload rejected: cannot read the file; the previous policy stays in force");
                return Ok(());
            }
        };
        if text == self.policy_text && trigger != "SIGHUP" {
            return Ok(());
        }
        if text.trim().is_empty() && trigger != "SIGHUP" {
            // Caught between an in-place truncate and its write: the write's
            // close raises another event.
            return Ok(());
        }
        if text == self.rejected_text && trigger != "SIGHUP" {
            // Rejected already; said so once.
            return Ok(());
        }
        let display = self.policy_path.display().to_string();
        let mut policy = match crate::policy::parse_policy_str(&display, &text) {
            Ok(checked) => {
                for w in &checked.warnings {
                    warn!(diagnostic = w.to_string(); "policy warning");
                }
                checked.policy
            }
            Err(diagnostics) => {
                self.reload_errors += 1;
                // Only an applied policy becomes the text to compare against.
                self.rejected_text = text;
                for d in diagnostics.iter().filter(|d| d.is_error()) {
                    error!(trigger = trigger, diagnostic = d.to_string(); "policy reload rejected; the previous policy stays in force");
                }
                return Ok(());
            }
        };
        if let Err(e) = self.ids.assign(&mut policy) {
            self.reload_errors += 1;
            error!(trigger = trigger, error = e; "policy reload rejected; the previous policy stays in force");
            return Ok(());
        }
        // The slot about to be written holds the generation before the live
        // one: empty it first.
        let next = self.generation + 1;
        self.retiring = None;
        self.datapath.retire_slot(slot_of(next))?;
        let compiled = compile(&policy, slot_of(next));
        if let Err(e) = self.datapath.write_policy(&compiled) {
            self.reload_errors += 1;
            error!(trigger = trigger, error = format!("{e:#}"); "policy reload rejected: the kernel refused its entries; the previous policy stays in force");
            self.datapath.retire_slot(slot_of(next))?;
            return Ok(());
        }
        let mut matcher = cgroups::SegmentMatcher::new(&policy);
        let scanned = cgroups::scan_with(&self.root, &mut matcher)?;
        let _ = self.labels.apply(&mut self.datapath, &policy, &scanned, Some(slot_of(next)))?;
        self.datapath.switch_generation(next)?;
        self.labels.slot = slot_of(next);
        self.retiring = Some(slot_of(self.generation));
        self.generation = next;
        self.policy = policy;
        self.matcher = matcher;
        self.policy_text = text;
        self.set_names(&scanned);
        // Workload addresses follow at once, in both slots.
        self.node.refresh_workloads(&self.root, &scanned);
        self.node.apply(&mut self.datapath)?;
        info!(
            trigger = trigger,
            generation = next as u64,
            name = self.policy.name.as_str(),
            segments = self.policy.segments.len() as u64,
            rules = self.policy.rules.len() as u64;
            "policy applied"
        );
        Ok(())
    }

    /// What the metrics endpoint, the control socket and `flows` read.
    fn snapshot(&self) -> Snapshot {
        let counter = |i| self.datapath.counter(i).unwrap_or(0);
        let flows = self.datapath.read_flows().unwrap_or_default();
        let created = counter(ztai_common::COUNTER_FLOWS_CREATED);
        Snapshot {
            policy_name: self.policy.name.clone(),
            generation: self.generation as u64,
            segments: self.policy.segments.iter().map(|s| s.name.clone()).collect(),
            labeled_cgroups: self.labels.labeled_count() as u64,
            totals: Totals {
                allowed: counter(ztai_common::COUNTER_ALLOWED),
                denied: counter(ztai_common::COUNTER_DENIED),
                audited: counter(ztai_common::COUNTER_AUDITED),
                events_dropped: counter(ztai_common::COUNTER_EVENTS_DROPPED),
                // Entries made minus entries alive: what the LRU pushed out.
                flow_table_evictions: created.saturating_sub(flows.len() as u64),
                socket_table_full: counter(ztai_common::COUNTER_SOCKET_TABLE_FULL),
                udp_replies: counter(ztai_common::COUNTER_UDP_REPLIES),
                reload_errors: self.reload_errors,
                label_failures: self.labels.failures,
                revoked_packets: counter(ztai_common::COUNTER_REVOKED),
                reports_folded: counter(ztai_common::COUNTER_REPORTS_FOLDED),
            },
            flows: records(&self.policy, &flows),
            ready: true,
        }
    }
}

fn names_for(ids: &SegmentIds, cgroups: &[LabeledCgroup]) -> NameTable {
    let mut segments = vec!["host".to_string(), "world".to_string()];
    for (name, id) in &ids.by_name {
        let i = *id as usize;
        if segments.len() <= i {
            segments.resize(i + 1, String::new());
        }
        segments[i] = name.clone();
    }
    NameTable { segments, cgroups: cgroups.iter().map(|c| (c.id, format!("/{}", c.rel_path))).collect() }
}

/// Ring-buffer records handled per wake-up: a storm must not keep signals,
/// reloads and the rescan tick waiting, nor hold its lines back for long.
const EVENT_BATCH: usize = 4096;

/// Report bytes written at once within a batch: a whole batch of lines
/// would be megabytes of buffer for no fewer system calls worth having.
const REPORT_CHUNK: usize = 64 * 1024;

/// Cgroup ids that events named but a scan did not find (a socket can
/// outlive its cgroup), so a flood from one costs one scan per rebuild of
/// the names (each tick) rather than one per batch.
#[derive(Debug, Default)]
struct CgroupMisses {
    missed: HashSet<u64>,
    /// A scan ran for the current batch already: at most one per batch.
    scanned: bool,
}

impl CgroupMisses {
    fn new_batch(&mut self) {
        self.scanned = false;
    }

    fn clear(&mut self) {
        self.missed.clear();
    }

    /// Gives `names` the path of cgroup `id` if `rescan` (fresh names, None
    /// if the scan failed) can, unless `id` is known, was missed already, or
    /// this batch scanned once.
    fn resolve(&mut self, id: u64, names: &mut NameTable, rescan: impl FnOnce() -> Option<NameTable>) {
        if self.scanned || names.cgroups.contains_key(&id) || self.missed.contains(&id) {
            return;
        }
        self.scanned = true;
        if let Some(fresh) = rescan() {
            *names = fresh;
        }
        // Also after a failed scan: retrying it per batch is the cost avoided.
        if !names.cgroups.contains_key(&id) {
            self.missed.insert(id);
        }
    }
}

fn write_reports(batch: &mut report::LineBatch) {
    if batch.is_empty() {
        return;
    }
    if let Err(e) = batch.write_to(&mut std::io::stdout().lock()) {
        // stdout gone (closed pipe): keep enforcing, say each lost line on stderr.
        if e.unwritten.is_empty() {
            error!(error = e.source.to_string(); "cannot write violation report to stdout");
        }
        for line in &e.unwritten {
            error!(event = line.as_str(); "cannot write violation report to stdout");
        }
    }
}

pub async fn run(config: RunConfig) -> Result<(), RuntimeError> {
    let RunConfig { policy_path, policy: Checked { policy, warnings }, cgroup_root, rescan_every, services, pin_dir, detach_on_exit, map_sizes } = config;
    for w in &warnings {
        warn!(diagnostic = w.to_string(); "policy warning");
    }
    if let KernelSupport::Untested { release } = crate::discovery::kernel::check()? {
        let (major, minor) = crate::discovery::kernel::OLDEST_TESTED;
        warn!(release = release, oldest_tested = format!("{major}.{minor}");
            "this kernel has every feature ztai needs but is older than any kernel its test suite runs on");
    }
    // Without the capabilities it loads with, the kernel would refuse the
    // programs with EPERM or a verifier log: name them before touching it.
    let held = Capabilities::own()?;
    held.require_loadable()?;
    // Bind first: a busy port fails before the kernel is touched.
    let metrics_state = MetricsState::new();
    metrics_state.set_capabilities(report_missing_capabilities(&held));
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut metrics_bound = None;
    if let Some(addr) = services.metrics_addr {
        let listener = metrics::bind(addr).await?;
        let local = listener.local_addr().map_err(io_err("metrics listener has no address"))?;
        info!(addr = local.to_string(); "serving metrics");
        metrics_bound = Some(local);
        tokio::spawn(metrics::serve(listener, metrics_state.clone(), async move {
            let _ = metrics_stopped.await;
        }));
    }
    // Claim the control socket before loading anything: a second agent on
    // the same node fails here, before touching the kernel.
    let control = match &services.control_socket {
        Some(path) => Some(crate::control::ControlSocket::bind(path)?),
        None => None,
    };
    ensure_bpffs()?;
    let netns_cookie = local_addrs::own_netns_cookie().map_err(io_err("cannot read this network namespace's cookie"))?;
    let address_events = AddressEvents::subscribe().map_err(io_err("cannot subscribe to address changes (rtnetlink)"))?;
    let address_events = register(address_events, "cannot register rtnetlink socket")?;
    let policy_watch = PolicyFileWatcher::new(&policy_path).map_err(io_err(format!("cannot watch {}", policy_path.display())))?;
    let mut policy_watch = register(policy_watch, "cannot register the policy file watcher")?;

    let datapath = Datapath::load(pin_dir.as_deref(), &map_sizes)?;
    let mut enforcer = Enforcer::start(datapath, cgroup_root.clone(), policy_path.clone(), policy, netns_cookie)?;

    // Everything is in the maps before the first program runs. An adopted
    // agent's links keep running until ours are attached and pinned.
    enforcer.datapath.attach(&cgroup_root.path)?;
    enforcer.datapath.pin_links(enforcer.generation)?;
    let released = enforcer.datapath.release_previous_links(enforcer.generation)?;
    if let Some(g) = enforcer.adopted {
        info!(adopted_generation = g as u64, generation = enforcer.generation as u64, released_links = released as u64; "adopted pinned state of a previous agent");
    }
    let scanned = enforcer.scan()?;
    let existing = sockets::bound_sockets(&cgroup_root.mount, &scanned);
    let recorded = enforcer.datapath.record_existing_sockets(netns_cookie, &existing)?;
    // Connections older than our programs are held to the policy too.
    let established = sockets::established_tcp(&cgroup_root.mount, &scanned);
    let seeded = enforcer.datapath.seed_connections(enforcer.generation, &established)?;

    // The logger outlives the programs' use of it: the loop owns it until the
    // datapath is dropped below.
    let mut kernel_log = match enforcer.datapath.take_kernel_log() {
        Some(l) => Some(register(l, "cannot register the kernel log")?),
        None => None,
    };
    let watcher = CgroupWatcher::new(&cgroup_root.path).map_err(io_err("cannot watch cgroups (inotify)"))?;
    let mut watcher = register(watcher, "cannot register the cgroup watcher")?;
    let events = enforcer.datapath.take_events()?;
    let mut events = register(events, "cannot register the event ring buffer")?;
    let mut reports = report::LineBatch::default();

    let first = enforcer.snapshot();
    metrics_state.update(&first);
    let (snapshot_tx, snapshot_rx) = watch::channel(first);
    let (control_stop, control_stopped) = tokio::sync::oneshot::channel::<()>();
    let control_task = control.map(|c| {
        tokio::spawn(c.serve(snapshot_rx, async move {
            let _ = control_stopped.await;
        }))
    });

    // Handlers before "ready": a SIGHUP sent as soon as we say ready must
    // reload, not kill us (its default action).
    let mut sigterm = signal(SignalKind::terminate()).map_err(io_err("cannot install SIGTERM handler"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io_err("cannot install SIGINT handler"))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(io_err("cannot install SIGHUP handler"))?;
    info!(
        policy = policy_path.display().to_string(),
        name = enforcer.policy.name.as_str(),
        generation = enforcer.generation as u64,
        cgroup_root = cgroup_root.path.display().to_string(),
        segments = enforcer.policy.segments.len() as u64,
        rules = enforcer.policy.rules.len() as u64,
        labeled_cgroups = enforcer.labels.labeled_count() as u64,
        existing_sockets = recorded as u64,
        existing_connections = seeded as u64,
        metrics_addr = metrics_bound.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        control_socket = services.control_socket.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "off".into());
        "ready"
    );
    metrics_state.set_ready(true);

    let mut rescan = tokio::time::interval(rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let publish = |e: &Enforcer| {
        let now = e.snapshot();
        metrics_state.update(&now);
        snapshot_tx.send_replace(now);
    };

    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                enforcer.reload("SIGHUP")?;
                publish(&enforcer);
            }
            guard = policy_watch.readable_mut() => {
                let mut guard = guard.map_err(io_err("policy file watcher poll failed"))?;
                let touched = guard.get_inner_mut().drain();
                guard.clear_ready();
                if touched {
                    enforcer.reload("file change")?;
                    publish(&enforcer);
                }
            }
            guard = events.readable_mut() => {
                let mut guard = guard.map_err(io_err("event ring buffer poll failed"))?;
                let ring = guard.get_inner_mut();
                let clock = report::Clock::now();
                enforcer.misses.new_batch();
                let mut handled = 0;
                while handled < EVENT_BATCH {
                    let Some(item) = ring.next() else { break };
                    handled += 1;
                    if let Some(ev) = report::parse_event(&item) {
                        enforcer.name_cgroup(ev.cgroup_id);
                        reports.push(&report::render(&ev, &enforcer.names, &clock));
                        if reports.len() >= REPORT_CHUNK {
                            write_reports(&mut reports);
                        }
                    }
                }
                write_reports(&mut reports);
                if handled < EVENT_BATCH {
                    guard.clear_ready();
                } else {
                    // The ring may hold more, and the kernel does not wake a
                    // consumer that has not caught up: stay ready, so this
                    // branch runs again once the others had their turn.
                    guard.retain_ready();
                }
            }
            guard = address_events.readable() => {
                let mut guard = guard.map_err(io_err("rtnetlink poll failed"))?;
                if guard.get_inner().drain() {
                    match local_addrs::host_addresses() {
                        Ok(addrs) => {
                            enforcer.node.host = addrs;
                            enforcer.node.apply(&mut enforcer.datapath)?;
                        }
                        Err(e) => error!(error = e.to_string(); "cannot list this host's addresses"),
                    }
                }
                guard.clear_ready();
            }
            guard = async { kernel_log.as_mut().expect("guarded by the branch condition").readable_mut().await }, if kernel_log.is_some() => {
                let mut guard = guard.map_err(io_err("kernel log poll failed"))?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            guard = watcher.readable_mut() => {
                let mut guard = guard.map_err(io_err("cgroup watcher poll failed"))?;
                let changed = guard.get_inner_mut().drain(&cgroup_root.path);
                guard.clear_ready();
                if changed {
                    enforcer.relabel()?;
                }
            }
            _ = rescan.tick() => {
                enforcer.tick()?;
                publish(&enforcer);
            }
        }
    };
    metrics_state.set_ready(false);
    let dropped = enforcer.datapath.counter(ztai_common::COUNTER_EVENTS_DROPPED).unwrap_or(0);
    drop(events);
    match (&pin_dir, detach_on_exit) {
        (Some(dir), false) => {
            info!(signal = signal_name, events_dropped = dropped, pin_dir = dir.display().to_string(); "shutting down; enforcement stays in place (pinned) for the next agent to adopt; `ztai-agent uninstall` removes it");
            drop(enforcer);
        }
        (Some(dir), true) => {
            info!(signal = signal_name, events_dropped = dropped, pin_dir = dir.display().to_string(); "shutting down: detaching programs and removing pins");
            enforcer.datapath.detach_and_unpin()?;
        }
        (None, _) => {
            info!(signal = signal_name, events_dropped = dropped; "shutting down: detaching programs");
            drop(enforcer);
        }
    }
    drop(kernel_log);
    drop(metrics_stop);
    let _ = control_stop.send(());
    if let Some(task) = control_task {
        match task.await {
            Ok(Err(e)) => error!(error = format!("{e:#}"); "control socket failed"),
            Err(e) => error!(error = e.to_string(); "control socket task failed"),
            Ok(Ok(())) => {}
        }
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Names as _;

    fn names(known: &[u64]) -> NameTable {
        NameTable { segments: Vec::new(), cgroups: known.iter().map(|id| (*id, format!("/cg{id}"))).collect() }
    }

    #[test]
    fn an_unknown_cgroup_costs_one_scan_until_the_names_are_rebuilt() {
        let mut misses = CgroupMisses::default();
        let mut table = names(&[1]);
        let mut scans = 0;
        for _batch in 0..3 {
            misses.new_batch();
            for id in [1, 7, 7] {
                misses.resolve(id, &mut table, || {
                    scans += 1;
                    Some(names(&[1]))
                });
            }
        }
        assert_eq!(scans, 1, "a known id never scans; a missed one only once");
        // The tick rebuilt the names: the id gets one more chance.
        misses.clear();
        misses.new_batch();
        misses.resolve(7, &mut table, || {
            scans += 1;
            None
        });
        assert_eq!(scans, 2);
        misses.new_batch();
        misses.resolve(7, &mut table, || {
            scans += 1;
            None
        });
        assert_eq!(scans, 2, "a failed scan is not retried per batch either");
    }

    #[test]
    fn a_scan_that_finds_the_cgroup_names_it() {
        let mut misses = CgroupMisses::default();
        let mut table = names(&[]);
        misses.new_batch();
        misses.resolve(5, &mut table, || Some(names(&[5])));
        assert_eq!(table.cgroup_path(5).as_deref(), Some("/cg5"));
        assert!(misses.missed.is_empty());
    }

    #[test]
    fn one_scan_per_batch_for_distinct_unknown_ids_each_missed_at_most_once() {
        let mut misses = CgroupMisses::default();
        let mut table = names(&[]);
        let mut scans = 0;
        for _batch in 0..4 {
            misses.new_batch();
            for id in [8, 9] {
                misses.resolve(id, &mut table, || {
                    scans += 1;
                    Some(names(&[]))
                });
            }
        }
        // Batch 1 scans for 8, batch 2 for 9, then neither again.
        assert_eq!(scans, 2);
    }

    #[test]
    fn addresses_are_written_again_only_after_a_change() {
        let mut node = NodeAddresses {
            netns_cookie: 1,
            host: ["192.0.2.1".parse().unwrap()].into_iter().collect(),
            workloads: Vec::new(),
            applied: None,
        };
        assert!(!node.is_applied());
        node.applied = Some((node.host.clone(), node.workloads.clone()));
        assert!(node.is_applied());
        node.workloads.push(workloads::WorkloadNetns {
            cookie: 2,
            addrs: ["198.18.0.2".parse().unwrap()].into_iter().collect(),
            segments: [3].into_iter().collect(),
        });
        assert!(!node.is_applied());
    }
}
