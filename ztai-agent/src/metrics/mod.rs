//! Prometheus/OpenMetrics exposition of the flow table and kernel totals,
//! plus liveness and readiness, over a small HTTP endpoint.
//!
//! The runtime feeds [`MetricsState::update`] each time it polls the kernel;
//! scrapes encode from the latest state, so a scrape never touches the kernel.
mod accounts;
mod http;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Registry, Unit},
};

pub use http::{bind, serve};

use self::accounts::Accounts;
use crate::flows::Snapshot;

/// The media type `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode metrics")]
    Encode(#[from] std::fmt::Error),
}

/// Shared metrics state: clone it freely, every clone sees the same data.
#[derive(Clone, Debug)]
pub struct MetricsState {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    registry: Registry,
    accounts: Arc<Mutex<Accounts>>,
    capabilities: Arc<Mutex<CapabilityStates>>,
    ready: AtomicBool,
}

/// Capabilities whose absence only makes the agent see less, by name, with
/// whether each is missing. Set once at start.
type CapabilityStates = Vec<(&'static str, bool)>;

impl Default for MetricsState {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsState {
    pub fn new() -> Self {
        let accounts = Arc::new(Mutex::new(Accounts::default()));
        let capabilities = Arc::new(Mutex::new(CapabilityStates::new()));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(StateCollector { accounts: accounts.clone(), capabilities: capabilities.clone() }));
        Self { shared: Arc::new(Shared { registry, accounts, capabilities, ready: AtomicBool::new(false) }) }
    }

    /// Which capabilities the agent lacks (`true`) or holds, by name: one
    /// `ztai_capability_missing` series each, so an alert can key on `== 1`.
    pub fn set_capabilities(&self, missing_by_name: Vec<(&'static str, bool)>) {
        *lock(&self.shared.capabilities) = missing_by_name;
    }

    /// Folds one poll of the kernel into the cumulative counters.
    pub fn update(&self, snapshot: &Snapshot) {
        lock(&self.shared.accounts).update(snapshot);
    }

    /// Whether the policy is applied and the programs attached (`/readyz`).
    pub fn set_ready(&self, ready: bool) {
        self.shared.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
    }

    /// The OpenMetrics text exposition, `# EOF` included.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.shared.registry)?;
        Ok(out)
    }
}

/// A panic elsewhere while holding the lock leaves counters that are at worst
/// one update stale; serving them beats failing every later scrape.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Encodes straight from the accounts at scrape time: series come and go
/// with segments, which registry families cannot forget.
#[derive(Debug)]
struct StateCollector {
    accounts: Arc<Mutex<Accounts>>,
    capabilities: Arc<Mutex<CapabilityStates>>,
}

const FLOW_LABELS: [&str; 6] = ["src_segment", "dst_segment", "proto", "port", "direction", "verdict"];

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let a = lock(&self.accounts);

        // Counter names go without `_total`: the encoder appends it.
        for (name, unit, help, pick) in [
            (
                "ztai_flow_packets",
                None,
                "Packets seen on flows, by segment pair, protocol, rule port, direction and verdict.",
                (|c: &accounts::Counts| [c.orig_packets, c.reply_packets]) as fn(&accounts::Counts) -> [u64; 2],
            ),
            (
                "ztai_flow",
                Some(&Unit::Bytes),
                "Bytes seen on flows, by segment pair, protocol, rule port, direction and verdict.",
                |c: &accounts::Counts| [c.orig_bytes, c.reply_bytes],
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
            for (k, counts) in a.series() {
                for (direction, value) in ["orig", "reply"].into_iter().zip(pick(counts)) {
                    let values = [&k.src_segment, &k.dst_segment, &k.proto, &k.port, direction, &k.verdict];
                    let labels: Vec<(&str, &str)> = FLOW_LABELS.into_iter().zip(values).collect();
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }

        let t = &a.totals;
        let mut verdicts = encoder.encode_descriptor(
            "ztai_policy_verdicts",
            "Policy decisions taken by the kernel programs, by verdict.",
            None,
            MetricType::Counter,
        )?;
        for (verdict, n) in [("allow", t.allowed.get()), ("deny", t.denied.get()), ("audit", t.audited.get())] {
            ConstCounter::new(n).encode(verdicts.encode_family(&[("verdict", verdict)])?)?;
        }

        let counters = [
            ("ztai_events_dropped", "Violation events lost because the event ring buffer was full.", t.events_dropped.get()),
            ("ztai_flow_table_evictions", "Flows evicted from the kernel's LRU flow table.", t.flow_table_evictions.get()),
            ("ztai_policy_reload_errors", "Policy reloads rejected; the previous policy stayed in force.", t.reload_errors.get()),
            ("ztai_revoked_packets", "Packets of established connections dropped after a reload or relabel revoked them.", t.revoked_packets.get()),
            ("ztai_socket_table_full", "Labeled sockets refused because the socket-owner map was full (fail closed).", t.socket_table_full.get()),
            ("ztai_label_failures", "Cgroups the label map refused (full); unlabeled traffic then fails closed.", t.label_failures.get()),
            ("ztai_violation_reports_folded", "Ingress drops not printed because they repeated their flow's report line within a minute.", t.reports_folded.get()),
        ];
        for (name, help, n) in counters {
            let m = ConstCounter::new(n);
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
        }

        // Gauges are i64 in OpenMetrics text; saturate rather than wrap.
        let gauges = [
            ("ztai_labeled_cgroups", "Cgroups currently labeled with a declared segment.", a.labeled_cgroups),
            ("ztai_policy_generation", "Generation of the policy loaded in the kernel.", a.generation),
        ];
        for (name, help, v) in gauges {
            let m = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
        }

        let mut capabilities = encoder.encode_descriptor(
            "ztai_capability_missing",
            "1 for a capability the agent lacks, 0 for one it holds: without it the agent enforces but misses what it lets it see (deploy/README.md).",
            None,
            MetricType::Gauge,
        )?;
        for (name, missing) in lock(&self.capabilities).iter() {
            ConstGauge::new(i64::from(*missing)).encode(capabilities.encode_family(&[("capability", *name)])?)?;
        }

        let build = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        build.encode(encoder.encode_descriptor("ztai_build", "Agent build information.", None, build.metric_type())?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
