//! The event loop: set up the datapath, keep labels and local addresses in
//! step with the node, turn kernel events into reports, clean up on signals.
use std::{
    collections::HashMap,
    io::Write as _,
    path::PathBuf,
    time::Duration,
};

use log::{error, info, warn};
use tokio::{io::unix::AsyncFd, signal::unix::{SignalKind, signal}};
use ztai_common::SegmentId;

use tokio::sync::watch;

use crate::{
    datapath::{Datapath, DatapathError, local_addr_key},
    flows::{Snapshot, Totals, records},
    metrics::{self, MetricsError, MetricsState},
    discovery::{
        cgroup_watch::CgroupWatcher,
        cgroups::{self, CgroupError, CgroupRoot, LabeledCgroup},
        local_addrs::{self, AddressEvents},
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
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
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

fn register<T: std::os::fd::AsRawFd>(inner: T, what: &str) -> Result<AsyncFd<T>, RuntimeError> {
    // SAFETY: `inner` owns its fd and the AsyncFd owns `inner`, so the fd
    // stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }.map_err(|e| RuntimeError::Io { what: what.into(), source: e.into() })
}

fn names_for(policy: &Policy, cgroups: &[LabeledCgroup]) -> NameTable {
    let mut segments = vec!["host".to_string(), "world".to_string()];
    segments.extend(policy.segments.iter().map(|s| s.name.clone()));
    NameTable { segments, cgroups: cgroups.iter().map(|c| (c.id, format!("/{}", c.rel_path))).collect() }
}

/// This host's addresses and those of labeled workloads in their own
/// network namespaces, as the kernel needs them.
struct NodeAddresses {
    netns_cookie: u64,
    host: std::collections::BTreeSet<std::net::IpAddr>,
    workloads: Vec<workloads::WorkloadNetns>,
}

impl NodeAddresses {
    fn refresh_workloads(&mut self, root: &CgroupRoot, scanned: &[LabeledCgroup]) {
        self.workloads = workloads::scan(&root.mount, scanned);
    }

    fn apply(&self, datapath: &mut Datapath) -> Result<(), RuntimeError> {
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
        Ok(())
    }
}

/// What the metrics endpoint, the control socket and `flows` read.
fn snapshot(datapath: &Datapath, policy: &Policy, labels: &Labels, generation: u8) -> Snapshot {
    let counter = |i| datapath.counter(i).unwrap_or(0);
    let flows = datapath.read_flows().unwrap_or_default();
    let created = counter(ztai_common::COUNTER_FLOWS_CREATED);
    Snapshot {
        policy_name: policy.name.clone(),
        generation: generation as u64,
        segments: policy.segments.iter().map(|s| s.name.clone()).collect(),
        labeled_cgroups: labels.labeled_count() as u64,
        totals: Totals {
            allowed: counter(ztai_common::COUNTER_ALLOWED),
            denied: counter(ztai_common::COUNTER_DENIED),
            audited: counter(ztai_common::COUNTER_AUDITED),
            events_dropped: counter(ztai_common::COUNTER_EVENTS_DROPPED),
            // Entries made minus entries alive: what the LRU pushed out.
            flow_table_evictions: created.saturating_sub(flows.len() as u64),
            socket_table_full: counter(ztai_common::COUNTER_SOCKET_TABLE_FULL),
            udp_replies: counter(ztai_common::COUNTER_UDP_REPLIES),
        },
        flows: records(policy, &flows),
        ready: true,
    }
}

/// Where the agent serves what it knows.
#[derive(Debug, Clone)]
pub struct Services {
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub control_socket: Option<PathBuf>,
}

struct Labels {
    current: HashMap<u64, SegmentId>,
}

impl Labels {
    /// Writes what changed since the last scan; reports ambiguities once.
    fn apply(&mut self, datapath: &mut Datapath, policy: &Policy, scanned: &[LabeledCgroup]) -> Result<(), RuntimeError> {
        let mut changed = Vec::new();
        for c in scanned {
            if self.current.get(&c.id) != Some(&c.segment) {
                if !c.also_matched.is_empty() {
                    let others: Vec<&str> = c.also_matched.iter().map(|id| policy.segment_name(*id)).collect();
                    warn!(cgroup = format!("/{}", c.rel_path), segment = policy.segment_name(c.segment), also = others.join(","); "cgroup matches several segments; using the first in file order");
                }
                changed.push((c.id, c.segment));
            }
        }
        let seen: std::collections::HashSet<u64> = scanned.iter().map(|c| c.id).collect();
        let gone: Vec<u64> = self.current.keys().filter(|id| !seen.contains(id)).copied().collect();
        let failed = datapath.set_cgroup_labels(&changed)?;
        for id in &failed {
            error!(cgroup_id = *id; "cannot label cgroup (map full?); unlabeled traffic under the attach point now fails closed");
        }
        for (id, seg) in changed.iter().filter(|(id, _)| !failed.contains(id)) {
            self.current.insert(*id, *seg);
        }
        if !gone.is_empty() {
            datapath.remove_cgroup_labels(&gone)?;
            for id in gone {
                self.current.remove(&id);
            }
        }
        Ok(())
    }

    fn labeled_count(&self) -> usize {
        self.current.values().filter(|s| **s >= ztai_common::SEGMENT_FIRST_DECLARED).count()
    }
}

fn write_report_line(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        // stdout gone (closed pipe): keep enforcing, say it once per event on stderr.
        error!(event = line; "cannot write violation report to stdout");
    }
}

pub async fn run(config: RunConfig) -> Result<(), RuntimeError> {
    let RunConfig { policy_path, policy: Checked { policy, warnings }, cgroup_root, rescan_every, services } = config;
    for w in &warnings {
        warn!(diagnostic = w.to_string(); "policy warning");
    }
    // Bind first: a busy port fails before the kernel is touched.
    let metrics_state = MetricsState::new();
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
    ensure_bpffs()?;
    let netns_cookie = local_addrs::own_netns_cookie().map_err(io_err("cannot read this network namespace's cookie"))?;

    let mut datapath = Datapath::load()?;
    let compiled = compile(&policy, 0);
    datapath.apply_policy(&compiled)?;

    let scanned = cgroups::scan(&cgroup_root, &policy)?;
    let mut labels = Labels { current: HashMap::new() };
    labels.apply(&mut datapath, &policy, &scanned)?;
    let mut names = names_for(&policy, &scanned);

    let address_events = AddressEvents::subscribe().map_err(io_err("cannot subscribe to address changes (rtnetlink)"))?;
    let address_events = register(address_events, "cannot register rtnetlink socket")?;
    let host_addrs = local_addrs::host_addresses().map_err(io_err("cannot list this host's addresses"))?;
    let mut node = NodeAddresses { netns_cookie, host: host_addrs, workloads: Vec::new() };
    node.refresh_workloads(&cgroup_root, &scanned);
    node.apply(&mut datapath)?;

    // Everything is in the maps before the first program runs.
    datapath.attach(&cgroup_root.path)?;
    let existing = sockets::bound_sockets_of_labeled(&cgroup_root.mount, &scanned);
    let recorded = datapath.record_existing_sockets(netns_cookie, &existing)?;

    // The logger outlives the programs' use of it: the loop owns it until the
    // datapath is dropped below.
    let mut kernel_log = match datapath.take_kernel_log() {
        Some(l) => Some(register(l, "cannot register the kernel log")?),
        None => None,
    };
    let watcher = CgroupWatcher::new(&cgroup_root.path).map_err(io_err("cannot watch cgroups (inotify)"))?;
    let mut watcher = register(watcher, "cannot register the cgroup watcher")?;
    let events = datapath.take_events()?;
    let mut events = register(events, "cannot register the event ring buffer")?;

    let first = snapshot(&datapath, &policy, &labels, compiled.generation);
    metrics_state.update(&first);
    let (snapshot_tx, snapshot_rx) = watch::channel(first);
    let _consumers = start_consumers(&services, snapshot_rx)?;

    info!(
        policy = policy_path.display().to_string(),
        name = policy.name.as_str(),
        generation = compiled.generation as u64,
        cgroup_root = cgroup_root.path.display().to_string(),
        segments = policy.segments.len() as u64,
        rules = policy.rules.len() as u64,
        labeled_cgroups = labels.labeled_count() as u64,
        existing_sockets = recorded as u64,
        metrics_addr = metrics_bound.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
        "ready"
    );
    metrics_state.set_ready(true);

    let mut sigterm = signal(SignalKind::terminate()).map_err(io_err("cannot install SIGTERM handler"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(io_err("cannot install SIGINT handler"))?;
    let mut rescan = tokio::time::interval(rescan_every);
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            guard = events.readable_mut() => {
                let mut guard = guard.map_err(io_err("event ring buffer poll failed"))?;
                let ring = guard.get_inner_mut();
                let mut unknown_cgroup = false;
                while let Some(item) = ring.next() {
                    if let Some(ev) = report::parse_event(&item) {
                        if !names.cgroups.contains_key(&ev.cgroup_id) && !unknown_cgroup {
                            // A cgroup newer than the last scan: learn its path now.
                            unknown_cgroup = true;
                            if let Ok(fresh) = cgroups::scan(&cgroup_root, &policy) {
                                names = names_for(&policy, &fresh);
                            }
                        }
                        write_report_line(&report::render(&ev, &names).to_string());
                    }
                }
                guard.clear_ready();
            }
            guard = address_events.readable() => {
                let mut guard = guard.map_err(io_err("rtnetlink poll failed"))?;
                if guard.get_inner().drain() {
                    match local_addrs::host_addresses() {
                        Ok(addrs) => {
                            node.host = addrs;
                            node.apply(&mut datapath)?;
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
                    match cgroups::scan(&cgroup_root, &policy) {
                        Ok(scanned) => {
                            labels.apply(&mut datapath, &policy, &scanned)?;
                            names = names_for(&policy, &scanned);
                        }
                        Err(e) => error!(error = format!("{e:#}"); "cgroup rescan failed"),
                    }
                }
            }
            _ = rescan.tick() => {
                match cgroups::scan(&cgroup_root, &policy) {
                    Ok(scanned) => {
                        labels.apply(&mut datapath, &policy, &scanned)?;
                        node.refresh_workloads(&cgroup_root, &scanned);
                        node.apply(&mut datapath)?;
                        names = names_for(&policy, &scanned);
                    }
                    Err(e) => error!(error = format!("{e:#}"); "cgroup rescan failed"),
                }
                let now = snapshot(&datapath, &policy, &labels, compiled.generation);
                metrics_state.update(&now);
                snapshot_tx.send_replace(now);
            }
        }
    };
    metrics_state.set_ready(false);
    let dropped = datapath.counter(ztai_common::COUNTER_EVENTS_DROPPED).unwrap_or(0);
    info!(signal = signal_name, events_dropped = dropped; "shutting down: detaching programs");
    drop(events);
    drop(datapath);
    drop(kernel_log);
    drop(metrics_stop);
    info!("stopped");
    Ok(())
}


/// Starts the consumers of snapshots (metrics endpoint, control socket).
/// Dropping the returned guard stops them.
fn start_consumers(services: &Services, snapshots: watch::Receiver<Snapshot>) -> Result<Vec<tokio::task::JoinHandle<()>>, RuntimeError> {
    let _ = (services, snapshots);
    Ok(Vec::new())
}
