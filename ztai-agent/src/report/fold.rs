//! Folds repeated ingress drops into one line per flow and window.
//!
//! A drop at the receiver is reported per packet: a dropped SYN comes back as
//! retransmits (1 s, 3 s, 7 s, … later) and a blocked UDP sender keeps
//! sending, each packet one event with the same 5-tuple. The first is printed;
//! identical ones within [`WINDOW`] of it are folded; the first after the
//! window is printed again with `"folded": N`, the number folded since the
//! previous line. Every fold also counts in `ztai_violation_reports_folded`,
//! so nothing is lost when a flow stops while some are folded. A new attempt
//! from a new source port is a new flow, and egress reports (one per
//! connect/sendmsg) are never folded.
use std::collections::HashMap;

use ztai_common::{DIRECTION_INGRESS, ViolationEvent};

/// How long identical ingress drops fold into the line that opened the window.
pub const WINDOW_NS: u64 = 60_000_000_000;
/// Flows remembered at most; beyond it a new flow is printed unfolded (more
/// lines, never fewer) until old ones expire.
pub const CAPACITY: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    cgroup_id: u64,
    src_addr: [u32; 4],
    dst_addr: [u32; 4],
    src_port: u16,
    dst_port: u16,
    proto: u8,
    verdict: u8,
    reason: u8,
}

impl FlowKey {
    fn of(ev: &ViolationEvent) -> Self {
        Self {
            cgroup_id: ev.cgroup_id,
            src_addr: ev.src_addr,
            dst_addr: ev.dst_addr,
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            proto: ev.proto,
            verdict: ev.verdict,
            reason: ev.reason,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Window {
    /// Kernel time (`bpf_ktime_get_ns`) of the line that opened it.
    opened_ns: u64,
    folded: u64,
}

/// What to do with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fold {
    /// Print it; `folded` identical events were folded since this flow's previous line.
    Print { folded: u64 },
    /// Counted, not printed.
    Folded,
}

#[derive(Debug, Default)]
pub struct IngressFolder {
    windows: HashMap<FlowKey, Window>,
    folded_total: u64,
}

impl IngressFolder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, ev: &ViolationEvent) -> Fold {
        if ev.direction != DIRECTION_INGRESS {
            return Fold::Print { folded: 0 };
        }
        let key = FlowKey::of(ev);
        match self.windows.get_mut(&key) {
            Some(w) if ev.ts_ns.saturating_sub(w.opened_ns) < WINDOW_NS => {
                w.folded += 1;
                self.folded_total += 1;
                Fold::Folded
            }
            Some(w) => {
                let folded = std::mem::take(&mut w.folded);
                w.opened_ns = ev.ts_ns;
                Fold::Print { folded }
            }
            None => {
                if self.windows.len() < CAPACITY {
                    self.windows.insert(key, Window { opened_ns: ev.ts_ns, folded: 0 });
                }
                Fold::Print { folded: 0 }
            }
        }
    }

    /// Forgets flows whose window ended before `now_ns` (kernel time); their
    /// folded counts stay in [`IngressFolder::folded_total`].
    pub fn expire(&mut self, now_ns: u64) {
        self.windows.retain(|_, w| now_ns.saturating_sub(w.opened_ns) < WINDOW_NS);
    }

    /// Events folded since the agent started.
    pub fn folded_total(&self) -> u64 {
        self.folded_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ztai_common::{DIRECTION_EGRESS, PROTO_TCP};

    fn syn(ts_s: u64, src_port: u16) -> ViolationEvent {
        ViolationEvent {
            ts_ns: ts_s * 1_000_000_000,
            cgroup_id: 9,
            src_addr: [1, 0, 0, 0],
            dst_addr: [2, 0, 0, 0],
            src_port,
            dst_port: 8080,
            proto: PROTO_TCP,
            direction: DIRECTION_INGRESS,
            sock_cookie: 0,
            pid_tgid: 0,
            uid_gid: 0,
            src_segment: 0,
            dst_segment: 1,
            verdict: 0,
            reason: 0,
            hook: 0,
            _pad: [0; 7],
            comm: [0; 16],
        }
    }

    #[test]
    fn retransmits_fold_into_the_first_line_and_the_next_window_carries_their_count() {
        let mut f = IngressFolder::new();
        assert_eq!(f.observe(&syn(100, 40000)), Fold::Print { folded: 0 });
        for t in [101, 103, 107, 115, 131] {
            assert_eq!(f.observe(&syn(t, 40000)), Fold::Folded, "t={t}");
        }
        assert_eq!(f.observe(&syn(163, 40000)), Fold::Print { folded: 5 });
        assert_eq!(f.observe(&syn(164, 40000)), Fold::Folded);
        assert_eq!(f.folded_total(), 6);
    }

    #[test]
    fn another_source_port_or_an_egress_report_is_never_folded() {
        let mut f = IngressFolder::new();
        assert_eq!(f.observe(&syn(1, 40000)), Fold::Print { folded: 0 });
        assert_eq!(f.observe(&syn(1, 40001)), Fold::Print { folded: 0 });
        let egress = ViolationEvent { direction: DIRECTION_EGRESS, ..syn(1, 40000) };
        assert_eq!(f.observe(&egress), Fold::Print { folded: 0 });
        assert_eq!(f.observe(&egress), Fold::Print { folded: 0 });
        assert_eq!(f.folded_total(), 0);
    }

    #[test]
    fn expired_flows_are_forgotten_but_their_folds_stay_counted() {
        let mut f = IngressFolder::new();
        f.observe(&syn(1, 40000));
        f.observe(&syn(2, 40000));
        f.expire(62 * 1_000_000_000);
        assert!(f.windows.is_empty());
        assert_eq!(f.folded_total(), 1);
        assert_eq!(f.observe(&syn(63, 40000)), Fold::Print { folded: 0 });
    }

    #[test]
    fn a_full_table_prints_new_flows_unfolded() {
        let mut f = IngressFolder::new();
        for i in 0..CAPACITY {
            let mut ev = syn(1, 1);
            ev.cgroup_id = i as u64 + 100;
            f.observe(&ev);
        }
        let extra = syn(1, 2);
        assert_eq!(f.observe(&extra), Fold::Print { folded: 0 });
        assert_eq!(f.observe(&extra), Fold::Print { folded: 0 });
    }
}
