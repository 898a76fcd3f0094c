//! Violation events (ring buffer) and counters (per-CPU). Reporting never
//! blocks or changes a verdict: a full ring buffer only bumps a counter.
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
    generated::bpf_ktime_get_ns,
};
use ztai_common::{COUNTER_EVENTS_DROPPED, SegmentId, ViolationEvent};

use crate::{addr::Addr, maps::{COUNTERS, EVENTS}};

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

#[inline(always)]
pub fn report(flow: &Flow, verdict: u8, reason: u8) {
    let Some(mut entry) = EVENTS.reserve::<ViolationEvent>(0) else {
        count(COUNTER_EVENTS_DROPPED);
        return;
    };
    let comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
    entry.write(ViolationEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: flow.cgroup_id,
        sock_cookie: flow.sock_cookie,
        pid_tgid: bpf_get_current_pid_tgid(),
        uid_gid: bpf_get_current_uid_gid(),
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
        _pad: [0; 7],
        comm,
    });
    entry.submit(0);
}
