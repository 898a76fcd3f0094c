//! Rule lookup: is (src, dst, proto, port) allowed by the active generation?
use aya_ebpf::maps::lpm_trie::Key;
use ztai_common::{
    CONFIG_FLAG_LABELS_INCOMPLETE, MAX_SEGMENTS, PAIR_ANY_PORT, PAIR_HAS_PORTS, PAIR_HAS_RANGES, PairKey,
    PortKey, RANGE_KEY_FIXED_BITS, REASON_LABELS_INCOMPLETE, REASON_NO_RULE, SEGMENT_FLAG_AUDIT, SEGMENT_HOST,
    SEGMENT_WORLD, SegmentId,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY, range_key_data,
};

use crate::maps::{RULE_PAIRS, RULE_PORTS, RULE_RANGES, SEGMENT_FLAGS};

pub struct Verdict {
    pub verdict: u8,
    pub reason: u8,
}

pub const ALLOW: Verdict = Verdict { verdict: VERDICT_ALLOW, reason: 0 };

/// Two hash lookups on the allowed path whatever the policy size; the LPM trie
/// is consulted only for pairs that have port ranges.
#[inline(always)]
fn rule_allows(generation: u8, src: SegmentId, dst: SegmentId, proto: u8, port: u16) -> bool {
    let pair = PairKey { src, dst, generation, proto, _pad: [0; 2] };
    let Some(value) = (unsafe { RULE_PAIRS.get(&pair) }) else {
        return false;
    };
    let flags = value.flags;
    if flags & PAIR_ANY_PORT != 0 {
        return true;
    }
    if flags & PAIR_HAS_PORTS != 0 {
        let key = PortKey { src, dst, generation, proto, port };
        if unsafe { RULE_PORTS.get(&key) }.is_some() {
            return true;
        }
    }
    if flags & PAIR_HAS_RANGES != 0 {
        let key = Key::new(RANGE_KEY_FIXED_BITS + 16, range_key_data(generation, proto, src, dst, port));
        if RULE_RANGES.get(&key).is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn is_audit(generation: u8, segment: SegmentId) -> bool {
    if segment >= MAX_SEGMENTS {
        return false;
    }
    let index = generation as u32 * MAX_SEGMENTS + segment;
    match SEGMENT_FLAGS.get(index) {
        Some(flags) => *flags & SEGMENT_FLAG_AUDIT != 0,
        None => false,
    }
}

/// A denial for which every labeled end is in audit mode passes as `audit`
/// (the compiler gives the built-ins the audit bit so they are neutral).
#[inline(always)]
pub fn deny_or_audit(generation: u8, src: SegmentId, dst: SegmentId, reason: u8) -> Verdict {
    if is_audit(generation, src) && is_audit(generation, dst) {
        Verdict { verdict: VERDICT_AUDIT, reason }
    } else {
        Verdict { verdict: VERDICT_DENY, reason }
    }
}

/// While some cgroup could not be labeled (`CONFIG_FLAG_LABELS_INCOMPLETE`),
/// a `host` end under the attach point may be a labeled workload passing as
/// unlabeled: host-to-host traffic there is denied. Host to world stays open
/// (denying it would cut every unlabeled process off the network, the node's
/// own daemons included); labeled destinations still need a rule naming host.
#[inline(always)]
pub fn unless_labels_incomplete(v: Verdict, src: SegmentId, dst: SegmentId, config_flags: u32) -> Verdict {
    if v.verdict == VERDICT_ALLOW
        && src == SEGMENT_HOST
        && dst == SEGMENT_HOST
        && config_flags & CONFIG_FLAG_LABELS_INCOMPLETE != 0
    {
        return Verdict { verdict: VERDICT_DENY, reason: REASON_LABELS_INCOMPLETE };
    }
    v
}

#[inline(always)]
pub fn decide(generation: u8, src: SegmentId, dst: SegmentId, proto: u8, port: u16) -> Verdict {
    // Inside one segment, and between unlabeled processes and the world
    // (host is 0, world is 1), nothing is enforced.
    if src == dst || (src <= SEGMENT_WORLD && dst <= SEGMENT_WORLD) {
        return ALLOW;
    }
    if rule_allows(generation, src, dst, proto, port) {
        return ALLOW;
    }
    deny_or_audit(generation, src, dst, REASON_NO_RULE)
}
