//! Kernel violation events → one JSON line each on stdout.
use std::{collections::HashMap, io::Write, net::IpAddr};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use ztai_common::{
    DIRECTION_INGRESS, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_POST_BIND4, HOOK_POST_BIND6, HOOK_SENDMSG4,
    HOOK_SENDMSG6, PROTO_TCP, PROTO_UDP, REASON_LABELS_INCOMPLETE, REASON_NO_POLICY, REASON_NO_RULE,
    REASON_SOCKET_TABLE_FULL, REASON_UNKNOWN_FAMILY, SegmentId, VERDICT_AUDIT, VERDICT_DENY,
    ViolationEvent,
};

use crate::datapath::ip_from_words;

pub fn rfc3339_now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is valid storage; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, read once per batch of events
/// rather than twice per event.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    realtime_minus_monotonic_ns: i128,
}

impl Clock {
    pub fn now() -> Self {
        let wall = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Self { realtime_minus_monotonic_ns: wall - mono }
    }

    /// Wall-clock time of a `bpf_ktime_get_ns` (CLOCK_MONOTONIC) stamp.
    fn wall_time_of(&self, ktime_ns: u64) -> String {
        let wall = self.realtime_minus_monotonic_ns + ktime_ns as i128;
        let secs = wall.div_euclid(1_000_000_000) as i64;
        let nanos = wall.rem_euclid(1_000_000_000) as u32;
        DateTime::<Utc>::from_timestamp(secs, nanos)
            .unwrap_or_else(Utc::now)
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    }
}

pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        1 => "icmp",
        58 => "icmpv6",
        _ => "other",
    }
}

fn hook_name(hook: u8) -> &'static str {
    match hook {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_POST_BIND4 => "post_bind4",
        HOOK_POST_BIND6 => "post_bind6",
        ztai_common::HOOK_SKB_INGRESS => "skb_ingress",
        ztai_common::HOOK_SKB_EGRESS => "skb_egress",
        _ => "unknown",
    }
}

fn addr_json(words: [u32; 4]) -> Value {
    match ip_from_words(words) {
        ip if ip.is_unspecified() => Value::Null,
        IpAddr::V4(v4) => v4.to_string().into(),
        IpAddr::V6(v6) => v6.to_string().into(),
    }
}

fn port_json(port: u16) -> Value {
    if port == 0 { Value::Null } else { port.into() }
}

/// What the reporter needs to turn ids into names.
pub trait Names {
    fn segment_name(&self, id: SegmentId) -> String;
    /// "/a/b" style path of a cgroup id, if known.
    fn cgroup_path(&self, id: u64) -> Option<String>;
}

/// Segment names by id plus cgroup paths by id, refreshed by the runtime.
#[derive(Debug, Default, Clone)]
pub struct NameTable {
    pub segments: Vec<String>,
    pub cgroups: HashMap<u64, String>,
}

impl Names for NameTable {
    fn segment_name(&self, id: SegmentId) -> String {
        self.segments.get(id as usize).cloned().unwrap_or_else(|| format!("unknown-segment-{id}"))
    }
    fn cgroup_path(&self, id: u64) -> Option<String> {
        self.cgroups.get(&id).cloned()
    }
}

/// The sentence a person reads first.
pub fn reason_text(ev: &ViolationEvent, names: &dyn Names) -> String {
    let src = names.segment_name(ev.src_segment);
    let dst = names.segment_name(ev.dst_segment);
    let proto = proto_name(ev.proto);
    match ev.reason {
        REASON_NO_RULE => format!("no rule allows {src} -> {dst} {proto}/{}", ev.dst_port),
        REASON_SOCKET_TABLE_FULL => format!(
            "socket-owner table is full: a socket of segment {src} could not be recorded, so it is refused rather than passing as host"
        ),
        REASON_UNKNOWN_FAMILY => format!("address family unknown to ztai: {src} fails closed"),
        REASON_LABELS_INCOMPLETE => {
            "the agent could not label every cgroup, so unlabeled traffic under the attach point fails closed".to_string()
        }
        REASON_NO_POLICY => "no policy is loaded yet, so everything under the attach point fails closed".to_string(),
        ztai_common::REASON_REVOKED => format!(
            "connection revoked: the policy now in force no longer allows {src} -> {dst} {proto}/{}",
            ev.dst_port
        ),
        ztai_common::REASON_UNPARSEABLE => format!(
            "inbound packet to {dst} is neither TCP, UDP nor ICMP, or is IPv6 with extension headers ztai cannot read past, so it is dropped"
        ),
        other => format!("denied (reason code {other})"),
    }
}

pub fn render(ev: &ViolationEvent, names: &dyn Names, clock: &Clock) -> Value {
    let verdict = match ev.verdict {
        VERDICT_DENY => "deny",
        VERDICT_AUDIT => "audit",
        _ => "allow",
    };
    let direction = if ev.direction == DIRECTION_INGRESS { "ingress" } else { "egress" };
    let comm_len = ev.comm.iter().position(|b| *b == 0).unwrap_or(ev.comm.len());
    if ev.direction == DIRECTION_INGRESS {
        // Packet context: the sender is an address, the receiver our cgroup;
        // no task is known (the kernel was in softirq).
        let mut line = json!({
            "ts": clock.wall_time_of(ev.ts_ns),
            "verdict": verdict,
            "direction": direction,
            "proto": proto_name(ev.proto),
            "src": {
                "segment": names.segment_name(ev.src_segment),
                "cgroup": Value::Null,
                "pid": Value::Null,
                "comm": Value::Null,
                "uid": Value::Null,
                "addr": addr_json(ev.src_addr),
                "port": port_json(ev.src_port),
            },
            "dst": {
                "segment": names.segment_name(ev.dst_segment),
                "cgroup": names.cgroup_path(ev.cgroup_id),
                "cgroup_id": ev.cgroup_id,
                "addr": addr_json(ev.dst_addr),
                "port": port_json(ev.dst_port),
            },
            "reason": reason_text(ev, names),
            "hook": hook_name(ev.hook),
        });
        if ev.folded > 0 {
            line["folded"] = ev.folded.into();
        }
        return line;
    }
    // Events raised in packet context name no task.
    let has_task = ev.pid_tgid != 0;
    json!({
        "ts": clock.wall_time_of(ev.ts_ns),
        "verdict": verdict,
        "direction": direction,
        "proto": proto_name(ev.proto),
        "src": {
            "segment": names.segment_name(ev.src_segment),
            "cgroup": names.cgroup_path(ev.cgroup_id),
            "cgroup_id": ev.cgroup_id,
            "pid": if has_task { Value::from((ev.pid_tgid >> 32) as u32) } else { Value::Null },
            "comm": if has_task { Value::from(String::from_utf8_lossy(&ev.comm[..comm_len])) } else { Value::Null },
            "uid": if has_task { Value::from(ev.uid_gid as u32) } else { Value::Null },
            "addr": addr_json(ev.src_addr),
            "port": port_json(ev.src_port),
        },
        "dst": {
            "segment": names.segment_name(ev.dst_segment),
            "addr": addr_json(ev.dst_addr),
            "port": port_json(ev.dst_port),
        },
        "reason": reason_text(ev, names),
        "hook": hook_name(ev.hook),
    })
}

/// Report lines gathered for one lock, write(2) and flush of stdout instead
/// of one of each per line. The runtime writes it at the end of every batch
/// of events (so no line waits for the next wake-up) and whenever it grows
/// large; the allocation is kept.
#[derive(Debug, Default)]
pub struct LineBatch {
    buf: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write violation reports")]
pub struct WriteError {
    #[source]
    pub source: std::io::Error,
    /// Lines not known to have been written, for saying them elsewhere.
    pub unwritten: Vec<String>,
}

impl LineBatch {
    pub fn push(&mut self, line: &Value) {
        let start = self.buf.len();
        // Into a Vec this only fails for maps with non-string keys, which a
        // Value cannot hold; drop a partial line all the same.
        match serde_json::to_writer(&mut self.buf, line) {
            Ok(()) => self.buf.push(b'\n'),
            Err(_) => self.buf.truncate(start),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Writes and flushes every pushed line, then empties the batch (also
    /// on error).
    pub fn write_to(&mut self, out: &mut impl Write) -> Result<(), WriteError> {
        let mut done = 0;
        let result = loop {
            if done == self.buf.len() {
                break out.flush();
            }
            match out.write(&self.buf[done..]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let outcome = result.map_err(|source| {
            // Lines from the first one not wholly written.
            let from = self.buf[..done].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let unwritten = String::from_utf8_lossy(&self.buf[from..]).lines().map(str::to_owned).collect();
            WriteError { source, unwritten }
        });
        self.buf.clear();
        outcome
    }
}

/// Parses one ring-buffer record; None if it is not a whole event.
pub fn parse_event(bytes: &[u8]) -> Option<ViolationEvent> {
    if bytes.len() < std::mem::size_of::<ViolationEvent>() {
        return None;
    }
    // SAFETY: length checked; ViolationEvent is Pod (any bit pattern valid); unaligned read.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ViolationEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::words_from_ip;

    fn names() -> NameTable {
        NameTable {
            segments: vec!["host".into(), "world".into(), "orchestrator".into(), "enterprise".into()],
            cgroups: [(42, "/ai.slice/orchestrator".to_string())].into_iter().collect(),
        }
    }

    fn event() -> ViolationEvent {
        let mut comm = [0u8; 16];
        comm[..5].copy_from_slice(b"agent");
        ViolationEvent {
            ts_ns: 1,
            cgroup_id: 42,
            sock_cookie: 7,
            pid_tgid: (1234u64 << 32) | 1235,
            uid_gid: (1000u64 << 32) | 1001,
            src_segment: 2,
            dst_segment: 3,
            src_addr: [0; 4],
            dst_addr: words_from_ip("198.18.40.9".parse().unwrap()),
            src_port: 0,
            dst_port: 443,
            proto: PROTO_TCP,
            direction: ztai_common::DIRECTION_EGRESS,
            verdict: VERDICT_DENY,
            reason: REASON_NO_RULE,
            hook: HOOK_CONNECT4,
            _pad: [0; 3],
            folded: 0,
            comm,
        }
    }

    #[test]
    fn a_denial_renders_every_required_key() {
        let v = render(&event(), &names(), &Clock::now());
        assert_eq!(v["verdict"], "deny");
        assert_eq!(v["direction"], "egress");
        assert_eq!(v["proto"], "tcp");
        assert_eq!(v["src"]["segment"], "orchestrator");
        assert_eq!(v["src"]["cgroup"], "/ai.slice/orchestrator");
        assert_eq!(v["src"]["pid"], 1234);
        assert_eq!(v["src"]["uid"], 1001);
        assert_eq!(v["src"]["comm"], "agent");
        assert_eq!(v["src"]["addr"], Value::Null);
        assert_eq!(v["src"]["port"], Value::Null);
        assert_eq!(v["dst"]["segment"], "enterprise");
        assert_eq!(v["dst"]["addr"], "198.18.40.9");
        assert_eq!(v["dst"]["port"], 443);
        assert_eq!(v["reason"], "no rule allows orchestrator -> enterprise tcp/443");
        assert!(DateTime::parse_from_rfc3339(v["ts"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn an_ingress_line_carries_the_folded_count_only_when_there_is_one() {
        let mut ev = event();
        ev.direction = DIRECTION_INGRESS;
        assert!(render(&ev, &names(), &Clock::now()).get("folded").is_none());
        ev.folded = 5;
        assert_eq!(render(&ev, &names(), &Clock::now())["folded"], 5);
    }

    #[test]
    fn a_stamp_converts_with_the_offset_read_once() {
        let clock = Clock { realtime_minus_monotonic_ns: 1_700_000_000_000_000_000 };
        assert_eq!(clock.wall_time_of(1_500), "2023-11-14T22:13:20.000001Z");
        // Before the epoch still gives a time, not a panic.
        let early = Clock { realtime_minus_monotonic_ns: -5_000_000_000 };
        assert_eq!(early.wall_time_of(0), "1969-12-31T23:59:55.000000Z");
    }

    /// Accepts `chunk` bytes per write, and fails once `limit` bytes are in.
    struct Stingy {
        got: Vec<u8>,
        chunk: usize,
        limit: usize,
        flushes: usize,
    }

    impl Write for Stingy {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.got.len() >= self.limit {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.chunk).min(self.limit - self.got.len());
            self.got.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    #[test]
    fn a_batch_is_the_lines_one_by_one_would_have_been_and_is_flushed_once() {
        let mut ingress = event();
        ingress.direction = DIRECTION_INGRESS;
        let clock = Clock::now();
        let lines = [render(&event(), &names(), &clock), render(&ingress, &names(), &clock)];
        let mut batch = LineBatch::default();
        for l in &lines {
            batch.push(l);
        }
        let mut out = Stingy { got: Vec::new(), chunk: 7, limit: usize::MAX, flushes: 0 };
        batch.write_to(&mut out).unwrap();
        let one_by_one: String = lines.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(String::from_utf8(out.got).unwrap(), one_by_one);
        assert_eq!(out.flushes, 1);
        assert!(batch.is_empty());
    }

    #[test]
    fn a_failed_write_returns_the_lines_not_wholly_written() {
        let mut batch = LineBatch::default();
        for port in [1, 2, 3] {
            batch.push(&json!({ "port": port }));
        }
        // The first line and half the second get through.
        let first = "{\"port\":1}\n".len();
        let mut out = Stingy { got: Vec::new(), chunk: usize::MAX, limit: first + 4, flushes: 0 };
        let err = batch.write_to(&mut out).unwrap_err();
        assert_eq!(err.source.kind(), std::io::ErrorKind::BrokenPipe);
        assert_eq!(err.unwritten, ["{\"port\":2}", "{\"port\":3}"]);
        assert!(batch.is_empty());
    }

    #[test]
    fn short_records_are_rejected() {
        assert!(parse_event(&[0u8; 8]).is_none());
    }
}
