//! The checked policy: what a valid file means, independent of YAML.

use std::fmt;

use globset::GlobMatcher;
use ztai_common::{PROTO_TCP, PROTO_UDP, SEGMENT_HOST, SEGMENT_WORLD, SegmentId};

use super::Span;

/// Name of the built-in segment of unlabeled local processes.
pub(crate) const HOST_NAME: &str = "host";
/// Name of the built-in segment of addresses outside every `cidrs` segment.
pub(crate) const WORLD_NAME: &str = "world";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Flows no rule allows are denied.
    Enforce,
    /// Flows no rule allows pass and are reported.
    Audit,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    /// `spec.mode`; each segment carries its effective mode.
    pub mode: Mode,
    /// Declared segments in file order: `segments[i].id == SEGMENT_FIRST_DECLARED + i`.
    pub segments: Vec<Segment>,
    /// Rules in file order: `rules[i].index == i`.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// `"host"`, `"world"`, the declared name, or `"unknown"`.
    pub fn segment_name(&self, id: SegmentId) -> &str {
        match id {
            SEGMENT_HOST => HOST_NAME,
            SEGMENT_WORLD => WORLD_NAME,
            _ => self.segment(id).map_or("unknown", |s| s.name.as_str()),
        }
    }

    pub fn segment_id(&self, name: &str) -> Option<SegmentId> {
        match name {
            HOST_NAME => Some(SEGMENT_HOST),
            WORLD_NAME => Some(SEGMENT_WORLD),
            _ => self.segments.iter().find(|s| s.name == name).map(|s| s.id),
        }
    }

    /// The declared segment with this id.
    pub fn segment(&self, id: SegmentId) -> Option<&Segment> {
        // Ids follow file order when parsed, but `renumber` may change them.
        self.segments.iter().find(|s| s.id == id)
    }

    /// Gives declared segments the ids `assign` picks by name (the agent
    /// keeps a segment's kernel id stable across reloads), rewriting rules.
    pub fn renumber(&mut self, assign: &mut dyn FnMut(&str) -> SegmentId) {
        let map: std::collections::HashMap<SegmentId, SegmentId> =
            self.segments.iter().map(|s| (s.id, assign(&s.name))).collect();
        let new = |id: SegmentId| map.get(&id).copied().unwrap_or(id);
        for s in &mut self.segments {
            s.id = new(s.id);
        }
        for r in &mut self.rules {
            r.from = new(r.from);
            r.to = new(r.to);
        }
    }

    /// Declared segments whose cgroup selectors match `rel_path` (relative to
    /// the cgroup2 mount, no leading '/'), in file order. A cgroup belongs to
    /// the first one.
    pub fn segments_matching_cgroup(&self, rel_path: &str) -> Vec<SegmentId> {
        self.segments.iter().filter(|s| s.cgroups.iter().any(|c| c.is_match(rel_path))).map(|s| s.id).collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub id: SegmentId,
    pub name: String,
    /// Effective mode: the segment's own `mode`, else `spec.mode`.
    pub mode: Mode,
    pub cgroups: Vec<CgroupSelector>,
    /// Network addresses (host bits clear).
    pub cidrs: Vec<ipnet::IpNet>,
    /// Position of the segment's name.
    pub span: Span,
}

/// A cgroup glob: `*` stays within one path level, `**` crosses levels.
#[derive(Clone, Debug)]
pub struct CgroupSelector {
    pub pattern: String,
    pub span: Span,
    matcher: GlobMatcher,
}

impl CgroupSelector {
    pub(crate) fn new(pattern: String, span: Span, matcher: GlobMatcher) -> Self {
        Self { pattern, span, matcher }
    }

    /// Does the glob match `rel_path` (relative to the cgroup2 mount, no leading '/')?
    pub fn is_match(&self, rel_path: &str) -> bool {
        self.matcher.is_match(rel_path)
    }
}

// The matcher is derived from the pattern, so pattern and position are the identity.
impl PartialEq for CgroupSelector {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern && self.span == other.span
    }
}

impl Eq for CgroupSelector {}

/// One `allow` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// 0-based position in `spec.allow`.
    pub index: u32,
    pub from: SegmentId,
    pub to: SegmentId,
    /// Never empty: an omitted `ports` is every tcp and every udp port.
    pub ports: Vec<PortSpec>,
    /// Position of the rule's first key.
    pub span: Span,
}

impl Rule {
    /// Does this rule allow `proto`/`port` (its own from/to aside)?
    pub fn allows_port(&self, proto: u8, port: u16) -> bool {
        self.ports.iter().any(|p| p.contains(proto, port))
    }
}

/// Destination ports of one protocol: `lo..=hi`; every port is `0..=65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub lo: u16,
    pub hi: u16,
}

impl PortSpec {
    pub const fn any(proto: u8) -> Self {
        Self { proto, lo: 0, hi: u16::MAX }
    }

    /// Every port of the protocol.
    pub fn is_any(&self) -> bool {
        self.lo == 0 && self.hi == u16::MAX
    }

    pub fn contains(&self, proto: u8, port: u16) -> bool {
        self.proto == proto && (self.lo..=self.hi).contains(&port)
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = proto_name(self.proto);
        if self.is_any() {
            write!(f, "{proto}/*")
        } else if self.lo == self.hi {
            write!(f, "{proto}/{}", self.lo)
        } else {
            write!(f, "{proto}/{}-{}", self.lo, self.hi)
        }
    }
}

/// `"tcp"`, `"udp"`, or `"proto N"` for anything else.
pub(crate) fn proto_name(proto: u8) -> std::borrow::Cow<'static, str> {
    match proto {
        PROTO_TCP => "tcp".into(),
        PROTO_UDP => "udp".into(),
        other => format!("proto {other}").into(),
    }
}
