//! Violation events (ring buffer) and counters (per-CPU). Reporting never
//! blocks or changes a verdict: a full ring buffer only bumps a counter.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::bpf_ktime_get_ns,
};
use ztai_common::{
    COUNTER_EVENTS_DROPPED, COUNTER_REPORTS_FOLDED, INGRESS_FOLD_WINDOW_NS, IngressReport, SegmentId, TupleKey,
    ViolationEvent,
};

use crate::{addr::Addr, maps::{COUNTERS, EVENTS, INGRESS_REPORTS}};

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}

pub struct Flow {
    pub cgroup_id: u64,
    pub sock_cookie: u64,
    pub src_segment: SegmentId,
    pub dst_segment: SegmentId,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub direction: u8,
    pub hook: u8,
}

/// An event from process context: the calling task is the one to blame.
#[inline(always)]
pub fn report(flow: &Flow, verdict: u8, reason: u8) {
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    emit(flow, verdict, reason, bpf_get_current_pid_tgid(), bpf_get_current_uid_gid(), comm, 0);
}

/// An event from packet context (softirq): the current task is whatever ran
/// when the packet arrived, so no task is named.
#[inline(always)]
pub fn report_without_task(flow: &Flow, verdict: u8, reason: u8) {
    emit(flow, verdict, reason, 0, 0, [0u8; 16], 0);
}

/// A drop at the receiver, folded per flow: reported unless the same flow
/// was reported less than `INGRESS_FOLD_WINDOW_NS` ago, in which case it is
/// counted; the next report of the flow carries how many were folded. Folded
/// here, not in the agent, so a flood of one flow cannot fill the ring buffer
/// and crowd out other reports.
#[inline(always)]
pub fn report_ingress_drop(tuple: &TupleKey, flow: &Flow, verdict: u8, reason: u8) {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut folded = 0;
    match INGRESS_REPORTS.get_ptr_mut(tuple) {
        Some(r) => unsafe {
            if now.wrapping_sub((*r).reported_ns) < INGRESS_FOLD_WINDOW_NS {
                (*r).folded = (*r).folded.saturating_add(1);
                count(COUNTER_REPORTS_FOLDED);
                return;
            }
            folded = (*r).folded;
            (*r).reported_ns = now;
            (*r).folded = 0;
        },
        None => {
            // LRU: a full table forgets the stalest flow, never blocks a report.
            let _ = INGRESS_REPORTS.insert(tuple, &IngressReport { reported_ns: now, folded: 0, _pad: 0 }, 0);
        }
    }
    emit(flow, verdict, reason, 0, 0, [0u8; 16], folded);
}

#[inline(always)]
fn emit(flow: &Flow, verdict: u8, reason: u8, pid_tgid: u64, uid_gid: u64, comm: [u8; 16], folded: u32) {
    let Some(mut entry) = EVENTS.reserve::<ViolationEvent>(0) else {
        count(COUNTER_EVENTS_DROPPED);
        return;
    };
    entry.write(ViolationEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: flow.cgroup_id,
        sock_cookie: flow.sock_cookie,
        pid_tgid,
        uid_gid,
        src_segment: flow.src_segment,
        dst_segment: flow.dst_segment,
        src_addr: flow.src_addr,
        dst_addr: flow.dst_addr,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction: flow.direction,
        verdict,
        reason,
        hook: flow.hook,
        _pad: [0; 3],
        folded,
        comm,
    });
    entry.submit(0);
}
