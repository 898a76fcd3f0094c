//! Cumulative flow accounting: turns successive views of the kernel's flow
//! table (an LRU whose entries, and their counters, can vanish at any time)
//! into per-label-set totals that never go down. Pure: no clock, no I/O.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use crate::flows::{FlowRecord, Snapshot, Totals};

/// Segments that exist whatever the policy declares.
const BUILTIN_SEGMENTS: [&str; 2] = ["host", "world"];

/// A flow missing from this many consecutive snapshots is forgotten. Not 1:
/// walking a kernel hash map while it changes can skip live entries, and a
/// flow forgotten by mistake would be counted again from zero when it shows
/// up again. When a flow is forgotten its contribution stays in the total.
const FORGET_AFTER_MISSES: u32 = 5;

/// Full identity of one kernel flow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlowKey {
    src_segment: String,
    dst_segment: String,
    dst_addr: IpAddr,
    dst_port: u16,
    proto: String,
    verdict: String,
}

impl FlowKey {
    fn of(f: &FlowRecord) -> Self {
        Self {
            src_segment: f.src_segment.clone(),
            dst_segment: f.dst_segment.clone(),
            dst_addr: f.dst_addr,
            dst_port: f.dst_port,
            proto: f.proto.clone(),
            verdict: f.verdict.clone(),
        }
    }
}

/// The labels of one exported series (direction is split out at encoding).
/// No address and no raw port: cardinality is bounded by the policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesKey {
    pub src_segment: String,
    pub dst_segment: String,
    pub proto: String,
    pub port: String,
    pub verdict: String,
}

impl SeriesKey {
    fn of(f: &FlowRecord) -> Self {
        Self {
            src_segment: f.src_segment.clone(),
            dst_segment: f.dst_segment.clone(),
            proto: f.proto.clone(),
            port: f.port_label.clone(),
            verdict: f.verdict.clone(),
        }
    }
}

/// Packet and byte counters in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl Counts {
    fn of(f: &FlowRecord) -> Self {
        Self {
            orig_packets: f.orig_packets,
            orig_bytes: f.orig_bytes,
            reply_packets: f.reply_packets,
            reply_bytes: f.reply_bytes,
        }
    }

    fn fields(&self) -> [u64; 4] {
        [self.orig_packets, self.orig_bytes, self.reply_packets, self.reply_bytes]
    }

    /// Whether any counter is below `earlier`'s: then this is a different
    /// kernel entry (evicted and re-created) that started again from zero.
    fn went_down_from(&self, earlier: &Counts) -> bool {
        self.fields().iter().zip(earlier.fields()).any(|(now, before)| *now < before)
    }

    fn minus(&self, earlier: &Counts) -> Counts {
        Counts {
            orig_packets: self.orig_packets.saturating_sub(earlier.orig_packets),
            orig_bytes: self.orig_bytes.saturating_sub(earlier.orig_bytes),
            reply_packets: self.reply_packets.saturating_sub(earlier.reply_packets),
            reply_bytes: self.reply_bytes.saturating_sub(earlier.reply_bytes),
        }
    }

    // Wrapping: a u64 byte counter cannot realistically overflow, and a
    // panic in the agent's hot loop would be worse than a wrapped counter.
    fn add(&mut self, d: &Counts) {
        self.orig_packets = self.orig_packets.wrapping_add(d.orig_packets);
        self.orig_bytes = self.orig_bytes.wrapping_add(d.orig_bytes);
        self.reply_packets = self.reply_packets.wrapping_add(d.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(d.reply_bytes);
    }
}

#[derive(Debug)]
struct SeenFlow {
    last: Counts,
    misses: u32,
}

/// A counter kept monotonic across resets of its source (e.g. the kernel
/// programs being reloaded): sum of deltas, as for flows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Monotonic {
    last: u64,
    total: u64,
}

impl Monotonic {
    fn observe(&mut self, raw: u64) {
        let delta = if raw >= self.last { raw - self.last } else { raw };
        self.total = self.total.wrapping_add(delta);
        self.last = raw;
    }

    pub fn get(&self) -> u64 {
        self.total
    }
}

/// Kernel-wide totals, made monotonic.
#[derive(Debug, Default)]
pub(crate) struct TotalCounters {
    pub allowed: Monotonic,
    pub denied: Monotonic,
    pub audited: Monotonic,
    pub events_dropped: Monotonic,
    pub flow_table_evictions: Monotonic,
    pub reload_errors: Monotonic,
    pub revoked_packets: Monotonic,
    pub socket_table_full: Monotonic,
    pub label_failures: Monotonic,
    pub reports_folded: Monotonic,
}

impl TotalCounters {
    fn observe(&mut self, t: &Totals) {
        self.allowed.observe(t.allowed);
        self.denied.observe(t.denied);
        self.audited.observe(t.audited);
        self.events_dropped.observe(t.events_dropped);
        self.flow_table_evictions.observe(t.flow_table_evictions);
        self.reload_errors.observe(t.reload_errors);
        self.revoked_packets.observe(t.revoked_packets);
        self.socket_table_full.observe(t.socket_table_full);
        self.label_failures.observe(t.label_failures);
        self.reports_folded.observe(t.reports_folded);
    }
}

/// Everything the exposition needs, updated once per kernel poll.
#[derive(Debug, Default)]
pub(crate) struct Accounts {
    flows: HashMap<FlowKey, SeenFlow>,
    /// Ordered so the exposition is stable from scrape to scrape.
    series: BTreeMap<SeriesKey, Counts>,
    pub totals: TotalCounters,
    pub labeled_cgroups: u64,
    pub generation: u64,
}

impl Accounts {
    pub fn update(&mut self, snap: &Snapshot) {
        self.totals.observe(&snap.totals);
        self.labeled_cgroups = snap.labeled_cgroups;
        self.generation = snap.generation;

        // Records are merged by identity first: the kernel keys flows by the
        // same tuple, but two segment ids rendered with one name must not be
        // diffed against each other.
        let mut current: HashMap<FlowKey, (SeriesKey, Counts)> = HashMap::with_capacity(snap.flows.len());
        for f in &snap.flows {
            let entry = current.entry(FlowKey::of(f)).or_insert_with(|| (SeriesKey::of(f), Counts::default()));
            entry.1.add(&Counts::of(f));
        }
        for (key, (series, now)) in &current {
            let delta = match self.flows.get_mut(key) {
                Some(seen) => {
                    let delta = if now.went_down_from(&seen.last) { *now } else { now.minus(&seen.last) };
                    seen.last = *now;
                    seen.misses = 0;
                    delta
                }
                None => {
                    self.flows.insert(key.clone(), SeenFlow { last: *now, misses: 0 });
                    *now
                }
            };
            // Deltas go to the flow's current labels: if a policy reload
            // relabels a live flow's port, only new traffic moves series.
            self.series.entry(series.clone()).or_default().add(&delta);
        }
        self.flows.retain(|k, seen| {
            if !current.contains_key(k) {
                seen.misses += 1;
            }
            seen.misses < FORGET_AFTER_MISSES
        });

        let known: HashSet<&str> = snap.segments.iter().map(String::as_str).chain(BUILTIN_SEGMENTS).collect();
        let live = |src: &str, dst: &str| known.contains(src) && known.contains(dst);
        self.series.retain(|k, _| live(&k.src_segment, &k.dst_segment));
        self.flows.retain(|k, _| live(&k.src_segment, &k.dst_segment));
    }

    pub fn series(&self) -> impl Iterator<Item = (&SeriesKey, &Counts)> {
        self.series.iter()
    }

    #[cfg(test)]
    fn remembered_flows(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(src: &str, dst: &str, addr: &str, port: u16, port_label: &str, verdict: &str, c: [u64; 4]) -> FlowRecord {
        FlowRecord {
            src_segment: src.into(),
            dst_segment: dst.into(),
            dst_addr: addr.parse().expect("test address"),
            dst_port: port,
            proto: "tcp".into(),
            verdict: verdict.into(),
            port_label: port_label.into(),
            orig_packets: c[0],
            orig_bytes: c[1],
            reply_packets: c[2],
            reply_bytes: c[3],
        }
    }

    fn snap(flows: Vec<FlowRecord>) -> Snapshot {
        Snapshot { segments: vec!["web".into(), "db".into()], flows, ..Default::default() }
    }

    fn series(a: &Accounts, src: &str, dst: &str, port: &str, verdict: &str) -> Option<Counts> {
        a.series()
            .find(|(k, _)| k.src_segment == src && k.dst_segment == dst && k.port == port && k.verdict == verdict)
            .map(|(_, c)| *c)
    }

    fn counts(c: [u64; 4]) -> Counts {
        Counts { orig_packets: c[0], orig_bytes: c[1], reply_packets: c[2], reply_bytes: c[3] }
    }

    #[test]
    fn deltas_accumulate_and_survive_eviction() {
        let mut a = Accounts::default();
        let f1 = |c| flow("web", "db", "10.0.0.1", 5432, "5432", "allow", c);
        let f2 = |c| flow("web", "db", "10.0.0.2", 5432, "5432", "allow", c);
        a.update(&snap(vec![f1([1, 100, 1, 50]), f2([2, 200, 2, 100])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([3, 300, 3, 150])));
        // Growth is added as a delta, not re-added in full.
        a.update(&snap(vec![f1([4, 400, 3, 150]), f2([2, 200, 2, 100])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([6, 600, 5, 250])));
        // f2 evicted: its contribution stays.
        a.update(&snap(vec![f1([4, 400, 3, 150])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([6, 600, 5, 250])));
        // f1 evicted and re-created between polls: counters went down, so the
        // new values are all new traffic.
        a.update(&snap(vec![f1([1, 10, 0, 0])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([7, 610, 5, 250])));
        // f2 back after a short absence, counters above its last: same entry,
        // skipped by one walk; only the growth counts.
        a.update(&snap(vec![f1([1, 10, 0, 0]), f2([3, 300, 2, 100])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([8, 710, 5, 250])));
    }

    #[test]
    fn long_gone_flows_are_forgotten_but_keep_their_total() {
        let mut a = Accounts::default();
        let f = |c| flow("web", "db", "10.0.0.1", 5432, "5432", "allow", c);
        a.update(&snap(vec![f([5, 500, 5, 500])]));
        for _ in 0..FORGET_AFTER_MISSES {
            a.update(&snap(vec![]));
        }
        assert_eq!(a.remembered_flows(), 0);
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([5, 500, 5, 500])));
        // Re-created later: counted from zero again, on top of the old total.
        a.update(&snap(vec![f([6, 600, 0, 0])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([11, 1100, 5, 500])));
    }

    #[test]
    fn series_of_vanished_segments_are_removed() {
        let mut a = Accounts::default();
        a.update(&snap(vec![
            flow("web", "db", "10.0.0.1", 5432, "5432", "allow", [1, 1, 1, 1]),
            flow("web", "world", "1.1.1.1", 443, "443", "allow", [1, 1, 1, 1]),
            flow("host", "db", "10.0.0.1", 22, "other", "deny", [1, 1, 0, 0]),
        ]));
        assert_eq!(a.series().count(), 3);
        // Policy reloaded without "db".
        a.update(&Snapshot { segments: vec!["web".into()], ..Default::default() });
        let left: Vec<_> = a.series().map(|(k, _)| (k.src_segment.as_str(), k.dst_segment.as_str())).collect();
        assert_eq!(left, [("web", "world")]);
        assert_eq!(a.remembered_flows(), 1, "per-flow memory of removed series is dropped too");
        // "db" declared again: starts from zero, nothing stale resurfaces.
        a.update(&snap(vec![flow("web", "db", "10.0.0.1", 5432, "5432", "allow", [1, 1, 1, 1])]));
        assert_eq!(series(&a, "web", "db", "5432", "allow"), Some(counts([1, 1, 1, 1])));
    }

    #[test]
    fn series_are_keyed_by_port_label_not_address_or_port() {
        let mut a = Accounts::default();
        // A denied scan: 1000 ports on 10 addresses, all outside any rule.
        let scan: Vec<_> = (0..1000u16)
            .map(|i| flow("web", "db", &format!("10.0.0.{}", i % 10), 1000 + i, "other", "deny", [1, 60, 0, 0]))
            .collect();
        a.update(&snap(scan));
        assert_eq!(a.series().count(), 1);
        assert_eq!(series(&a, "web", "db", "other", "deny"), Some(counts([1000, 60_000, 0, 0])));
        // A port range rule: distinct ports, one series.
        a.update(&snap(vec![
            flow("web", "db", "10.0.0.1", 9000, "9000-9100", "allow", [1, 1, 1, 1]),
            flow("web", "db", "10.0.0.1", 9050, "9000-9100", "allow", [1, 1, 1, 1]),
        ]));
        assert_eq!(a.series().count(), 2);
    }

    #[test]
    fn relabeled_flow_sends_only_new_traffic_to_the_new_series() {
        let mut a = Accounts::default();
        a.update(&snap(vec![flow("web", "db", "10.0.0.1", 9050, "9050", "allow", [1, 10, 1, 10])]));
        a.update(&snap(vec![flow("web", "db", "10.0.0.1", 9050, "9000-9100", "allow", [2, 20, 2, 20])]));
        assert_eq!(series(&a, "web", "db", "9050", "allow"), Some(counts([1, 10, 1, 10])));
        assert_eq!(series(&a, "web", "db", "9000-9100", "allow"), Some(counts([1, 10, 1, 10])));
    }

    #[test]
    fn totals_never_go_down() {
        let mut a = Accounts::default();
        let with = |denied| Snapshot { totals: Totals { denied, ..Default::default() }, ..Default::default() };
        a.update(&with(5));
        a.update(&with(7));
        assert_eq!(a.totals.denied.get(), 7);
        // Programs reloaded: kernel counter restarts.
        a.update(&with(2));
        assert_eq!(a.totals.denied.get(), 9);
    }
}
