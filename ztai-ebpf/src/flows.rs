//! Per-flow counters. Each connection is counted on one side only (see
//! `Conn::counted_by`), so loopback traffic, which crosses the sender's
//! egress and the receiver's ingress, is never counted twice.
use ztai_common::{COUNTER_FLOWS_CREATED, FlowCounters, FlowKey};

use crate::{events::count, maps::FLOWS};

pub const ORIG: bool = true;
pub const REPLY: bool = false;

#[inline(always)]
pub fn add(flow: &FlowKey, orig: bool, packets: u64, bytes: u64) {
    // Per-CPU values: no atomics and no contention between cores.
    if let Some(c) = FLOWS.get_ptr_mut(flow) {
        unsafe {
            if orig {
                (*c).orig_packets += packets;
                (*c).orig_bytes += bytes;
            } else {
                (*c).reply_packets += packets;
                (*c).reply_bytes += bytes;
            }
        }
        return;
    }
    let fresh = if orig {
        FlowCounters { orig_packets: packets, orig_bytes: bytes, reply_packets: 0, reply_bytes: 0 }
    } else {
        FlowCounters { orig_packets: 0, orig_bytes: 0, reply_packets: packets, reply_bytes: bytes }
    };
    // LRU: a full table evicts the least recently used flow, never fails.
    if FLOWS.insert(flow, &fresh, 0).is_ok() {
        count(COUNTER_FLOWS_CREATED);
    }
}
