//! Policy text → checked [`Policy`], collecting every problem on the way.
//!
//! Checking never stops at the first problem: each part of the document is
//! checked on its own and reports into one list, and later checks work with
//! whatever earlier ones could make sense of (an invalid segment name still
//! resolves in rules, so one mistake is not reported three times).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use globset::GlobBuilder;
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode, MarkedSequenceNode};
use marked_yaml::{LoadError, LoaderOptions, Node};
use ztai_common::{MAX_SEGMENTS, PROTO_TCP, PROTO_UDP, SEGMENT_FIRST_DECLARED, SEGMENT_HOST, SEGMENT_WORLD, SegmentId};

use super::compile::mapped_prefix;
use super::model::{HOST_NAME, WORLD_NAME};
use super::overlap::GlobLanguage;
use super::{
    API_VERSION, CgroupSelector, Checked, Diagnostic, KIND, Mode, Policy, PortSpec, Rule, Segment, Severity, Span,
};

const ROOT_KEYS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];
const METADATA_KEYS: &[&str] = &["name"];
const SPEC_KEYS: &[&str] = &["mode", "segments", "allow"];
const SEGMENT_KEYS: &[&str] = &["cgroups", "cidrs", "mode"];
const RULE_KEYS: &[&str] = &["from", "to", "ports"];
const MAX_NAME_LEN: usize = 63;
/// Two ids are taken by `host` and `world`.
const MAX_DECLARED: usize = (MAX_SEGMENTS - SEGMENT_FIRST_DECLARED) as usize;

pub(super) fn parse(file: &str, text: &str) -> Result<Checked, Vec<Diagnostic>> {
    // Editors do not count a byte-order mark as a column.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut cx = Checker { file, diagnostics: Vec::new() };
    check_single_document(&mut cx, text);
    let policy = load(&mut cx, text).and_then(|root| check_root(&mut cx, &root));
    let mut diagnostics = cx.diagnostics;
    // Stable: problems at one position keep the order they were found in.
    diagnostics.sort_by_key(|d| d.span);
    match policy {
        Some(policy) if !diagnostics.iter().any(Diagnostic::is_error) => Ok(Checked { policy, warnings: diagnostics }),
        _ => Err(diagnostics),
    }
}

struct Checker<'f> {
    file: &'f str,
    diagnostics: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn push(&mut self, severity: Severity, span: Span, message: String) {
        self.diagnostics.push(Diagnostic { severity, file: self.file.to_owned(), span, message });
    }

    fn error(&mut self, span: Span, message: impl Into<String>) {
        self.push(Severity::Error, span, message.into());
    }

    fn warning(&mut self, span: Span, message: impl Into<String>) {
        self.push(Severity::Warning, span, message.into());
    }
}

// ---------------------------------------------------------------- YAML layer

/// The YAML loader reads only the first document and silently drops the
/// rest, so a second policy pasted into the same file would be ignored.
fn check_single_document(cx: &mut Checker<'_>, text: &str) {
    let mut seen_content = false;
    let mut ended = false;
    for (i, line) in text.lines().enumerate() {
        let span = Span { line: i + 1, column: 1 };
        // A marker is the line's first three characters, alone or followed by blanks.
        let marker = |m: &str| line.strip_prefix(m).filter(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        let body = line.trim();
        if let Some(rest) = marker("---") {
            if seen_content || ended {
                cx.error(span, "a second YAML document starts here: a policy file holds exactly one policy");
                return;
            }
            let rest = rest.trim();
            seen_content = !rest.is_empty() && !rest.starts_with('#');
        } else if marker("...").is_some() {
            ended |= seen_content;
        } else if body.is_empty() || body.starts_with('#') || (!seen_content && line.starts_with('%')) {
            // Blank, comment or directive.
        } else if ended {
            cx.error(span, "content after the end of the YAML document (`...`) would be ignored");
            return;
        } else {
            seen_content = true;
        }
    }
}

fn load(cx: &mut Checker<'_>, text: &str) -> Option<Node> {
    // No coercion: a quoted "~" must stay a string, only plain scalars can be null.
    let strict = LoaderOptions::default().error_on_duplicate_keys(true).prevent_coercion(true);
    match marked_yaml::parse_yaml_with_options(0, text, strict) {
        Ok(root) => Some(root),
        Err(LoadError::DuplicateKey(dup)) => {
            let first = scalar_span(&dup.prev_key);
            cx.error(
                scalar_span(&dup.key),
                format!("duplicate key `{}` (first at line {})", dup.key.as_str(), first.line),
            );
            // The loader stops at the first duplicate. Go on with the last value
            // winning, so the duplicate does not hide other problems.
            let lenient = LoaderOptions::default().prevent_coercion(true);
            marked_yaml::parse_yaml_with_options(0, text, lenient).map_err(|e| report_load_error(cx, &e)).ok()
        }
        Err(e) => {
            report_load_error(cx, &e);
            None
        }
    }
}

fn report_load_error(cx: &mut Checker<'_>, e: &LoadError) {
    let at = |m: &marked_yaml::Marker| Span { line: m.line(), column: m.column() };
    let (span, message) = match e {
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => {
            (at(m), "a policy file must be a YAML mapping with apiVersion, kind, metadata and spec".to_owned())
        }
        LoadError::UnexpectedAnchor(m) => (at(m), "YAML anchors and aliases are not supported in policies".to_owned()),
        LoadError::MappingKeyMustBeScalar(m) => (at(m), "mapping keys must be plain strings".to_owned()),
        LoadError::UnexpectedTag(m) => (at(m), "YAML tags (`!tag`) are not supported in policies".to_owned()),
        LoadError::ScanError(m, scan) => (at(m), format!("invalid YAML: {}", scan.info())),
        // Only the strict loader reports duplicates, and `load` handles those itself.
        LoadError::DuplicateKey(dup) => (scalar_span(&dup.key), format!("duplicate key `{}`", dup.key.as_str())),
    };
    cx.error(span, message);
}

fn marker_span(span: &marked_yaml::Span) -> Span {
    span.start().map_or(Span::START, |m| Span { line: m.line(), column: m.column() })
}

fn scalar_span(node: &MarkedScalarNode) -> Span {
    marker_span(node.span())
}

/// A plain `~`, `null` or nothing at all.
fn is_null(node: &Node) -> bool {
    matches!(node, Node::Scalar(s) if s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
}

fn describe(node: &Node) -> &'static str {
    match node {
        _ if is_null(node) => "nothing",
        Node::Scalar(_) => "a string",
        Node::Sequence(_) => "a list",
        Node::Mapping(_) => "a mapping",
    }
}

/// Where to report a problem with a value. Block mappings and empty values
/// have no useful start mark of their own, so those point at their key.
fn value_span(node: &Node, key: Span) -> Span {
    match node {
        Node::Scalar(_) if is_null(node) => key,
        Node::Mapping(_) => key,
        _ => marker_span(node.span()),
    }
}

/// Position of a mapping that has no key of its own (a list item): its first key.
fn mapping_span(map: &MarkedMappingNode) -> Span {
    map.keys().map(scalar_span).min().unwrap_or_else(|| marker_span(map.span()))
}

fn entry<'n>(map: &'n MarkedMappingNode, key: &str) -> Option<(Span, &'n Node)> {
    map.iter().find(|(k, _)| k.as_str() == key).map(|(k, v)| (scalar_span(k), v))
}

fn check_keys(cx: &mut Checker<'_>, map: &MarkedMappingNode, allowed: &[&str], context: &str) {
    for key in map.keys() {
        if allowed.contains(&key.as_str()) {
            continue;
        }
        let hint = did_you_mean(key.as_str(), allowed.iter().copied())
            .map(|s| format!("did you mean `{s}`? "))
            .unwrap_or_default();
        cx.error(
            scalar_span(key),
            format!("unknown key `{}` in {context}; {hint}allowed keys: {}", key.as_str(), allowed.join(", ")),
        );
    }
}

fn as_mapping<'n>(cx: &mut Checker<'_>, node: &'n Node, key: Span, what: &str) -> Option<&'n MarkedMappingNode> {
    match node {
        Node::Mapping(m) => Some(m),
        _ => {
            cx.error(value_span(node, key), format!("{what} must be a mapping, found {}", describe(node)));
            None
        }
    }
}

fn as_list<'n>(cx: &mut Checker<'_>, node: &'n Node, key: Span, what: &str) -> Option<&'n MarkedSequenceNode> {
    match node {
        Node::Sequence(s) => Some(s),
        _ => {
            cx.error(value_span(node, key), format!("{what} must be a list, found {}", describe(node)));
            None
        }
    }
}

/// A non-empty string and its position.
fn as_string<'n>(cx: &mut Checker<'_>, node: &'n Node, key: Span, what: &str) -> Option<(&'n str, Span)> {
    match node {
        Node::Scalar(s) if !is_null(node) && !s.as_str().is_empty() => Some((s.as_str(), scalar_span(s))),
        Node::Scalar(s) if !is_null(node) => {
            cx.error(scalar_span(s), format!("{what} must not be empty"));
            None
        }
        _ => {
            cx.error(value_span(node, key), format!("{what} must be a string, found {}", describe(node)));
            None
        }
    }
}

fn parse_mode(cx: &mut Checker<'_>, node: &Node, key: Span, what: &str) -> Option<Mode> {
    let (text, span) = as_string(cx, node, key, what)?;
    match text {
        "enforce" => Some(Mode::Enforce),
        "audit" => Some(Mode::Audit),
        other => {
            cx.error(span, format!("unknown mode `{other}`: expected `enforce` or `audit`"));
            None
        }
    }
}

// ---------------------------------------------------------------- document

fn check_root(cx: &mut Checker<'_>, root: &Node) -> Option<Policy> {
    let Some(root) = root.as_mapping() else {
        cx.error(marker_span(root.span()), "a policy file must be a YAML mapping");
        return None;
    };
    check_keys(cx, root, ROOT_KEYS, "the policy");

    check_fixed(cx, root, "apiVersion", API_VERSION);
    check_fixed(cx, root, "kind", KIND);

    let name = match entry(root, "metadata") {
        None => {
            cx.error(Span::START, "missing `metadata` (with the policy's `name`)");
            None
        }
        Some((key, node)) => as_mapping(cx, node, key, "`metadata`").and_then(|metadata| {
            check_keys(cx, metadata, METADATA_KEYS, "`metadata`");
            match entry(metadata, "name") {
                Some((key, node)) => as_string(cx, node, key, "`metadata.name`").map(|(s, _)| s.to_owned()),
                None => {
                    cx.error(key, "missing `metadata.name`");
                    None
                }
            }
        }),
    };

    let Some((spec_key, spec)) = entry(root, "spec") else {
        cx.error(Span::START, "missing `spec` (with `segments` and `allow`)");
        return None;
    };
    let spec = as_mapping(cx, spec, spec_key, "`spec`")?;
    check_keys(cx, spec, SPEC_KEYS, "`spec`");

    let mode = match entry(spec, "mode") {
        Some((key, node)) => parse_mode(cx, node, key, "`spec.mode`"),
        None => Some(Mode::Enforce),
    };

    let segments = match entry(spec, "segments") {
        Some((key, node)) => {
            as_mapping(cx, node, key, "`spec.segments`").map(|m| check_segments(cx, m, mode.unwrap_or(Mode::Enforce)))
        }
        None => {
            cx.error(spec_key, "missing `spec.segments`");
            None
        }
    };
    // Without readable segments, unknown names in rules would only echo that problem.
    let no_segments = Declared::default();
    let names = SegmentNames::new(segments.as_ref().unwrap_or(&no_segments), segments.is_some());

    let rules = match entry(spec, "allow") {
        Some((key, node)) => check_rules(cx, node, key, &names),
        // No rules: every flow between segments is denied.
        None => Some(Vec::new()),
    };

    Some(Policy { name: name?, mode: mode?, segments: segments?.segments, rules: rules? })
}

/// `apiVersion` and `kind`: required, with one accepted value.
fn check_fixed(cx: &mut Checker<'_>, root: &MarkedMappingNode, key: &str, expected: &str) {
    match entry(root, key) {
        None => cx.error(Span::START, format!("missing `{key}`: expected `{key}: {expected}`")),
        Some((key_span, node)) => {
            if let Some((value, span)) = as_string(cx, node, key_span, &format!("`{key}`"))
                && value != expected
            {
                cx.error(span, format!("unsupported {key} `{value}`: expected `{expected}`"));
            }
        }
    }
}

// ---------------------------------------------------------------- segments

/// The declared segments, as far as they could be checked.
#[derive(Default)]
struct Declared {
    segments: Vec<Segment>,
    /// Segments declaring `cidrs` but no `cgroups`: they never hold a local
    /// process. Taken from the file, not from the selectors that passed, so a
    /// bad glob does not also make the segment's rules look ineffective.
    address_only: Vec<SegmentId>,
}

fn check_segments(cx: &mut Checker<'_>, map: &MarkedMappingNode, default_mode: Mode) -> Declared {
    let mut segments = Vec::new();
    let mut address_only = Vec::new();
    // Glob languages of every valid selector, with its segment's index, for the overlap check.
    let mut globs: Vec<(usize, Span, String, GlobLanguage)> = Vec::new();
    // Prefix in kernel form → (segment index, text, position): one segment per prefix.
    let mut prefixes: HashMap<([u8; 16], u32), (usize, String, Span)> = HashMap::new();

    for (key, body) in map.iter() {
        let name = key.as_str();
        let span = scalar_span(key);
        if name == HOST_NAME || name == WORLD_NAME {
            cx.error(
                span,
                format!("`{name}` is a built-in segment and cannot be declared; use it directly in `allow` rules"),
            );
            continue;
        }
        if let Err(message) = check_segment_name(name) {
            cx.error(span, message);
        }
        if segments.len() == MAX_DECLARED {
            cx.error(span, format!("too many segments: at most {MAX_DECLARED} may be declared"));
        }
        let index = segments.len();
        let mut segment = Segment {
            // `index < MAX_DECLARED` for any policy that passes, so this fits.
            id: SEGMENT_FIRST_DECLARED.saturating_add(u32::try_from(index).unwrap_or(u32::MAX)),
            name: name.to_owned(),
            mode: default_mode,
            cgroups: Vec::new(),
            cidrs: Vec::new(),
            span,
        };
        let nothing = format!(
            "segment `{name}` selects nothing: give it `cgroups` (process globs) or `cidrs` (address prefixes)"
        );
        if is_null(body) {
            cx.error(span, nothing);
            segments.push(segment);
            continue;
        }
        let Some(body) = as_mapping(cx, body, span, &format!("segment `{name}`")) else {
            segments.push(segment);
            continue;
        };
        check_keys(cx, body, SEGMENT_KEYS, &format!("segment `{name}`"));

        let (mut cgroup_selectors, mut cidr_selectors) = (0, 0);
        if let Some((key, node)) = entry(body, "cgroups")
            && let Some(list) = as_list(cx, node, key, &format!("`{name}.cgroups`"))
        {
            cgroup_selectors = list.len();
            for item in list.iter() {
                let Some((pattern, span)) = as_string(cx, item, key, "a cgroup glob") else { continue };
                if let Some((selector, language)) = check_glob(cx, pattern, span) {
                    globs.push((index, span, pattern.to_owned(), language));
                    segment.cgroups.push(selector);
                }
            }
        }
        if let Some((key, node)) = entry(body, "cidrs")
            && let Some(list) = as_list(cx, node, key, &format!("`{name}.cidrs`"))
        {
            cidr_selectors = list.len();
            for item in list.iter() {
                let Some((text, span)) = as_string(cx, item, key, "a cidr") else { continue };
                let Some(net) = check_cidr(cx, text, span) else { continue };
                match prefixes.entry(mapped_prefix(&net)) {
                    Entry::Vacant(e) => {
                        e.insert((index, text.to_owned(), span));
                        segment.cidrs.push(net);
                    }
                    Entry::Occupied(e) => {
                        let (other, other_text, other_span) = e.get();
                        let same = if other_text == text { String::new() } else { format!(" (as `{other_text}`)") };
                        if *other == index {
                            cx.warning(
                                span,
                                format!(
                                    "cidr `{text}` is already listed in segment `{name}`{same} at line {}",
                                    other_span.line
                                ),
                            );
                        } else {
                            let owner = segments.get(*other).map_or("?", |s: &Segment| s.name.as_str());
                            cx.error(span, format!(
                                "cidr `{text}` is already in segment `{owner}`{same} at line {}: a prefix can belong to one segment only",
                                other_span.line
                            ));
                        }
                    }
                }
            }
        }
        if cgroup_selectors + cidr_selectors == 0 {
            cx.error(span, nothing);
        } else if cgroup_selectors == 0 {
            address_only.push(segment.id);
        }
        if let Some((key, node)) = entry(body, "mode") {
            segment.mode = parse_mode(cx, node, key, &format!("`{name}.mode`")).unwrap_or(default_mode);
        }
        segments.push(segment);
    }

    check_overlaps(cx, &segments, &globs);
    Declared { segments, address_only }
}

fn check_segment_name(name: &str) -> Result<(), String> {
    let valid_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let problem = if name.is_empty() {
        "must not be empty"
    } else if name.len() > MAX_NAME_LEN {
        "is longer than 63 characters"
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        "must start with a lowercase letter"
    } else if !valid_chars {
        "may only contain lowercase letters, digits and '-'"
    } else {
        return Ok(());
    };
    let suggestion = name.to_ascii_lowercase().replace(['_', '.', ' '], "-");
    let hint = if suggestion != name && check_segment_name(&suggestion).is_ok() {
        format!(": write `{suggestion}`")
    } else {
        String::new()
    };
    Err(format!("segment name `{name}` {problem}{hint}"))
}

fn check_glob(cx: &mut Checker<'_>, pattern: &str, span: Span) -> Option<(CgroupSelector, GlobLanguage)> {
    if let Some(relative) = pattern.strip_prefix('/') {
        cx.error(
            span,
            format!(
                "cgroup glob `{pattern}` must be relative to the cgroup2 mount: write `{}`",
                relative.trim_start_matches('/')
            ),
        );
        return None;
    }
    // literal_separator: `*` stays within one path level, only `**` crosses levels.
    let glob = match GlobBuilder::new(pattern).literal_separator(true).build() {
        Ok(glob) => glob,
        Err(e) => {
            cx.error(span, format!("invalid cgroup glob `{pattern}`: {}", e.kind()));
            return None;
        }
    };
    let language = GlobLanguage::new(glob);
    let selector = CgroupSelector::new(pattern.to_owned(), span, language.matcher().clone());
    match language.example() {
        Ok(Some(_)) => {}
        Ok(None) => cx.warning(
            span,
            format!("cgroup glob `{pattern}` can never match: cgroup paths have no leading, trailing or doubled '/'"),
        ),
        Err(e) => cx.warning(span, format!("cannot analyse cgroup glob `{pattern}`: {e}")),
    }
    Some((selector, language))
}

fn check_cidr(cx: &mut Checker<'_>, text: &str, span: Span) -> Option<ipnet::IpNet> {
    match text.parse::<ipnet::IpNet>() {
        Ok(net) if net.trunc() == net => Some(net),
        Ok(net) => {
            cx.error(span, format!("cidr `{text}` has host bits set: write `{}`", net.trunc()));
            None
        }
        Err(_) => {
            let message = match text.parse::<IpAddr>() {
                Ok(IpAddr::V4(_)) => format!("cidr `{text}` needs a prefix length: write `{text}/32` for one address"),
                Ok(IpAddr::V6(_)) => format!("cidr `{text}` needs a prefix length: write `{text}/128` for one address"),
                Err(_) => {
                    format!("invalid cidr `{text}`: expected an IPv4 or IPv6 prefix such as `10.0.0.0/8` or `fd00::/8`")
                }
            };
            cx.error(span, message);
            None
        }
    }
}

/// Warns where a cgroup could match selectors of two segments: it silently
/// joins the first, which is rarely what the later selector's author meant.
fn check_overlaps(cx: &mut Checker<'_>, segments: &[Segment], globs: &[(usize, Span, String, GlobLanguage)]) {
    let name = |i: usize| segments.get(i).map_or("?", |s| s.name.as_str());
    for (j, (later_seg, later_span, later_pat, later)) in globs.iter().enumerate() {
        for (earlier_seg, earlier_span, earlier_pat, earlier) in &globs[..j] {
            if earlier_seg == later_seg {
                continue;
            }
            let (first, second) = (name(*earlier_seg), name(*later_seg));
            match earlier.common_example(later) {
                Ok(None) => {}
                Ok(Some(path)) => cx.warning(
                    *later_span,
                    format!(
                        "cgroup glob `{later_pat}` of segment `{second}` overlaps `{earlier_pat}` of segment `{first}` (line {}): \
                         a cgroup such as `{path}` matches both and joins `{first}`, the first in file order",
                        earlier_span.line
                    ),
                ),
                Err(e) => cx.warning(
                    *later_span,
                    format!(
                        "cannot decide whether cgroup glob `{later_pat}` of segment `{second}` overlaps `{earlier_pat}` of segment `{first}` (line {}): {e}",
                        earlier_span.line
                    ),
                ),
            }
        }
    }
}

// ---------------------------------------------------------------- rules

/// Names rules may use: declared segments (valid or not, so a bad name is
/// reported once) and the built-ins.
struct SegmentNames<'p> {
    ids: HashMap<&'p str, SegmentId>,
    /// Ends that never hold a local process: `world` and address-only segments.
    address_only: Vec<SegmentId>,
    declared: Vec<&'p str>,
    /// Report unknown names (false when the segments could not be read).
    report_unknown: bool,
}

impl<'p> SegmentNames<'p> {
    fn new(declared: &'p Declared, report_unknown: bool) -> Self {
        let segments = &declared.segments;
        let mut ids: HashMap<&str, SegmentId> = segments.iter().map(|s| (s.name.as_str(), s.id)).collect();
        ids.insert(HOST_NAME, SEGMENT_HOST);
        ids.insert(WORLD_NAME, SEGMENT_WORLD);
        Self {
            ids,
            address_only: declared.address_only.iter().copied().chain([SEGMENT_WORLD]).collect(),
            declared: segments.iter().map(|s| s.name.as_str()).collect(),
            report_unknown,
        }
    }

    fn resolve(&self, cx: &mut Checker<'_>, name: &str, span: Span, field: &str) -> Option<SegmentId> {
        if let Some(&id) = self.ids.get(name) {
            return Some(id);
        }
        if !self.report_unknown {
            return None;
        }
        let candidates = self.declared.iter().copied().chain([HOST_NAME, WORLD_NAME]);
        let message = match did_you_mean(name, candidates) {
            Some(close) => format!("unknown segment `{name}` in `{field}`: did you mean `{close}`?"),
            None if self.declared.is_empty() => {
                format!("unknown segment `{name}` in `{field}`: no segments are declared (built in: host, world)")
            }
            None => {
                const SHOWN: usize = 10;
                let mut list = self.declared.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
                if self.declared.len() > SHOWN {
                    list.push_str(", ...");
                }
                format!("unknown segment `{name}` in `{field}`: declared segments are {list} (built in: host, world)")
            }
        };
        cx.error(span, message);
        None
    }

    fn name(&self, id: SegmentId) -> &str {
        match id {
            SEGMENT_HOST => HOST_NAME,
            SEGMENT_WORLD => WORLD_NAME,
            _ => usize::try_from(id - SEGMENT_FIRST_DECLARED)
                .ok()
                .and_then(|i| self.declared.get(i))
                .copied()
                .unwrap_or("?"),
        }
    }
}

fn check_rules(cx: &mut Checker<'_>, node: &Node, key: Span, names: &SegmentNames<'_>) -> Option<Vec<Rule>> {
    if is_null(node) {
        cx.error(key, "`spec.allow` must be a list of rules, found nothing: write `allow: []` to allow no traffic between segments");
        return None;
    }
    let list = as_list(cx, node, key, "`spec.allow`")?;
    let mut rules = Vec::new();
    let mut complete = true;
    for (i, item) in list.iter().enumerate() {
        let item_span = value_span(item, marker_span(item.span()));
        let Some(map) = item.as_mapping() else {
            cx.error(
                item_span,
                format!("a rule must be a mapping with `from`, `to` and optional `ports`, found {}", describe(item)),
            );
            complete = false;
            continue;
        };
        let span = mapping_span(map);
        check_keys(cx, map, RULE_KEYS, "a rule");
        let end = |field: &str, cx: &mut Checker<'_>| match entry(map, field) {
            None => {
                cx.error(span, format!("rule is missing `{field}`"));
                None
            }
            Some((key, node)) => {
                let (name, at) = as_string(cx, node, key, &format!("`{field}`"))?;
                names.resolve(cx, name, at, field)
            }
        };
        let from = end("from", cx);
        let to = end("to", cx);
        let ports = match entry(map, "ports") {
            None => Some(vec![PortSpec::any(PROTO_TCP), PortSpec::any(PROTO_UDP)]),
            Some((key, node)) => check_ports(cx, node, key),
        };
        if let (Some(from), Some(to)) = (from, to) {
            warn_ineffective(cx, names, from, to, span);
        }
        let index = u32::try_from(i).ok();
        if index.is_none() {
            cx.error(span, "too many rules");
        }
        match (index, from, to, ports) {
            (Some(index), Some(from), Some(to), Some(ports)) => rules.push(Rule { index, from, to, ports, span }),
            _ => complete = false,
        }
    }
    complete.then_some(rules)
}

/// Rules that are valid but can never change a verdict.
fn warn_ineffective(cx: &mut Checker<'_>, names: &SegmentNames<'_>, from: SegmentId, to: SegmentId, span: Span) {
    let (a, b) = (names.name(from), names.name(to));
    if from == to {
        cx.warning(
            span,
            format!("rule from `{a}` to itself has no effect: traffic inside one segment is always allowed"),
        );
    } else if matches!((from, to), (SEGMENT_HOST, SEGMENT_WORLD) | (SEGMENT_WORLD, SEGMENT_HOST)) {
        cx.warning(
            span,
            format!("rule from `{a}` to `{b}` has no effect: traffic between unlabeled processes and the world is never enforced"),
        );
    } else if names.address_only.contains(&from) && names.address_only.contains(&to) {
        cx.warning(
            span,
            format!(
                "rule from `{a}` to `{b}` can never match: neither end holds local processes (only `host` and segments with `cgroups` do)"
            ),
        );
    }
}

fn check_ports(cx: &mut Checker<'_>, node: &Node, key: Span) -> Option<Vec<PortSpec>> {
    if is_null(node) {
        cx.error(key, "`ports` must be a list, found nothing: omit `ports` to allow every tcp and udp port");
        return None;
    }
    let list = as_list(cx, node, key, "`ports`")?;
    if list.is_empty() {
        cx.error(
            marker_span(list.span()),
            "`ports: []` is ambiguous: omit `ports` to allow every tcp and udp port, or list entries such as `443/tcp`",
        );
        return None;
    }
    let mut ports = Vec::with_capacity(list.len());
    let mut complete = true;
    for item in list.iter() {
        let parsed = as_string(cx, item, key, "a port entry")
            .and_then(|(text, span)| parse_port_entry(text).map_err(|message| cx.error(span, message)).ok());
        match parsed {
            Some(spec) => ports.push(spec),
            None => complete = false,
        }
    }
    complete.then_some(ports)
}

const PORT_FORMS: &str = "PORT/PROTO (`443/tcp`), LO-HI/PROTO (`9000-9100/tcp`) or a bare protocol (`tcp`, `udp`)";

/// `"8000/tcp"`, `"9000-9100/udp"`, or a bare `"tcp"`/`"udp"` for every port.
pub(crate) fn parse_port_entry(text: &str) -> Result<PortSpec, String> {
    let is_number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (ports, proto) = match text.split_once('/') {
        Some((ports, proto)) => (Some(ports), proto),
        None if is_number(text) => {
            return Err(format!("port {text} needs a protocol: write {text}/tcp or {text}/udp"));
        }
        None if text.split_once('-').is_some_and(|(a, b)| is_number(a) && is_number(b)) => {
            return Err(format!("port range {text} needs a protocol: write {text}/tcp or {text}/udp"));
        }
        None if matches!(text, "tcp" | "udp") => (None, text),
        None if matches!(text.to_ascii_lowercase().as_str(), "tcp" | "udp") => {
            return Err(format!("unknown protocol `{text}`: write `{}`", text.to_ascii_lowercase()));
        }
        None => return Err(format!("invalid port entry `{text}`: expected {PORT_FORMS}")),
    };
    let proto = match proto {
        "tcp" => PROTO_TCP,
        "udp" => PROTO_UDP,
        other if matches!(other.to_ascii_lowercase().as_str(), "tcp" | "udp") => {
            return Err(format!("unknown protocol `{other}` in `{text}`: write `{}`", other.to_ascii_lowercase()));
        }
        other => return Err(format!("unknown protocol `{other}` in `{text}`: expected tcp or udp")),
    };
    let Some(ports) = ports else { return Ok(PortSpec::any(proto)) };
    let port = |s: &str| -> Result<u16, String> {
        if !is_number(s) {
            return Err(format!("invalid port `{s}` in `{text}`: expected {PORT_FORMS}"));
        }
        match s.parse::<u32>() {
            Ok(p @ 1..=65535) => Ok(p as u16),
            _ => Err(format!("port {s} in `{text}` is out of range: ports are 1-65535")),
        }
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if lo > hi {
        let proto = super::model::proto_name(proto);
        return Err(format!("port range `{text}` runs backwards: write `{hi}-{lo}/{proto}`"));
    }
    Ok(PortSpec { proto, lo, hi })
}

// ---------------------------------------------------------------- suggestions

/// The closest candidate within a small edit distance, for "did you mean".
fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let limit = word.chars().count().div_ceil(3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: a swap of neighbours (`nmae`) counts as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_entries() {
        let ok = |s: &str| parse_port_entry(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("8000/tcp"), PortSpec { proto: PROTO_TCP, lo: 8000, hi: 8000 });
        assert_eq!(ok("9000-9100/udp"), PortSpec { proto: PROTO_UDP, lo: 9000, hi: 9100 });
        assert_eq!(ok("1-65535/tcp"), PortSpec { proto: PROTO_TCP, lo: 1, hi: 65535 });
        assert_eq!(ok("udp"), PortSpec::any(PROTO_UDP));
        let err = |s: &str| parse_port_entry(s).expect_err(s);
        assert_eq!(err("8000"), "port 8000 needs a protocol: write 8000/tcp or 8000/udp");
        assert_eq!(err("9000-9100"), "port range 9000-9100 needs a protocol: write 9000-9100/tcp or 9000-9100/udp");
        assert_eq!(err("0/tcp"), "port 0 in `0/tcp` is out of range: ports are 1-65535");
        assert_eq!(err("65536/udp"), "port 65536 in `65536/udp` is out of range: ports are 1-65535");
        assert_eq!(err("99999999999/udp"), "port 99999999999 in `99999999999/udp` is out of range: ports are 1-65535");
        assert_eq!(err("9100-9000/tcp"), "port range `9100-9000/tcp` runs backwards: write `9000-9100/tcp`");
        assert_eq!(err("8000/sctp"), "unknown protocol `sctp` in `8000/sctp`: expected tcp or udp");
        assert_eq!(err("8000/TCP"), "unknown protocol `TCP` in `8000/TCP`: write `tcp`");
        assert_eq!(err("TCP"), "unknown protocol `TCP`: write `tcp`");
        assert!(err("http").starts_with("invalid port entry `http`"));
        assert!(err("+80/tcp").starts_with("invalid port `+80`"));
        assert!(err("/tcp").starts_with("invalid port ``"));
        assert!(err("80-/tcp").starts_with("invalid port ``"));
    }

    #[test]
    fn segment_names() {
        assert!(check_segment_name("inference").is_ok());
        assert!(check_segment_name("a-1").is_ok());
        assert!(check_segment_name(&"a".repeat(63)).is_ok());
        assert!(check_segment_name(&"a".repeat(64)).is_err());
        assert_eq!(
            check_segment_name("Vector_DB").expect_err("invalid"),
            "segment name `Vector_DB` must start with a lowercase letter: write `vector-db`"
        );
        assert!(check_segment_name("1abc").is_err());
        assert!(check_segment_name("a.b").is_err());
    }

    #[test]
    fn suggestions() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("nmae", "name"), 1);
        assert_eq!(did_you_mean("mood", ["mode", "segments", "allow"]), Some("mode"));
        assert_eq!(did_you_mean("infrence", ["inference", "orchestrator"]), Some("inference"));
        assert_eq!(did_you_mean("port", ["from", "to", "ports"]), Some("ports"));
        assert_eq!(did_you_mean("xyz", ["inference", "orchestrator"]), None);
    }
}
