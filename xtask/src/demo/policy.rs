//! Reads the segments and allow rules of the reference policy, so the matrix
//! the demo expects is derived from the file the agent enforces (not from a
//! second copy of the rules). Only the plain subset of YAML the reference
//! policy uses is understood; anything else fails with its line number rather
//! than being guessed at. The agent itself validates the file fully.

use anyhow::bail;

#[derive(Debug, Clone)]
pub struct Segment {
    pub name: String,
    pub cgroups: Vec<String>,
    pub cidrs: Vec<String>,
    /// Per-segment `mode:` override (true = audit).
    pub audit: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub from: String,
    pub to: String,
    /// None = every port, tcp and udp.
    pub ports: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub audit: bool,
    pub segments: Vec<Segment>,
    pub rules: Vec<Rule>,
}

fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('#', None) => return &line[..i],
            _ => {}
        }
    }
    line
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

fn flow_list(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('[')?.strip_suffix(']')?;
    Some(inner.split(',').map(unquote).filter(|x| !x.is_empty()).collect())
}

fn mode(v: &str) -> Option<bool> {
    match unquote(v).as_str() {
        "audit" => Some(true),
        "enforce" => Some(false),
        _ => None,
    }
}

pub fn parse(text: &str) -> anyhow::Result<Policy> {
    #[derive(PartialEq)]
    enum Section {
        Top,
        Spec,
        Segments,
        Allow,
        Other,
    }
    let mut section = Section::Top;
    let mut p = Policy { audit: false, segments: Vec::new(), rules: Vec::new() };
    for (n, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim_end();
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let t = line.trim();
        let bad = || {
            anyhow::anyhow!(
                "policy line {}: the demo cannot read {:?} (it reads the plain YAML subset of policies/ai-reference.yaml)",
                n + 1,
                raw.trim()
            )
        };
        let (key, value) = match t.split_once(':') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => return Err(bad()),
        };
        match indent {
            0 => section = if key == "spec" { Section::Spec } else { Section::Other },
            2 if section != Section::Top && section != Section::Other => match key {
                "mode" => p.audit = mode(value).ok_or_else(bad)?,
                "segments" => section = Section::Segments,
                "allow" => section = Section::Allow,
                _ => return Err(bad()),
            },
            _ if section == Section::Other || section == Section::Top => {}
            4 if section == Section::Segments => {
                if !value.is_empty() {
                    return Err(bad());
                }
                p.segments.push(Segment { name: key.to_string(), cgroups: Vec::new(), cidrs: Vec::new(), audit: None });
            }
            6 if section == Section::Segments => {
                let seg = p.segments.last_mut().ok_or_else(bad)?;
                match key {
                    "cgroups" => seg.cgroups = flow_list(value).ok_or_else(bad)?,
                    "cidrs" => seg.cidrs = flow_list(value).ok_or_else(bad)?,
                    "mode" => seg.audit = Some(mode(value).ok_or_else(bad)?),
                    _ => return Err(bad()),
                }
            }
            4 | 6 if section == Section::Allow => {
                let key = if indent == 4 {
                    let Some(k) = key.strip_prefix("- ") else { return Err(bad()) };
                    p.rules.push(Rule { from: String::new(), to: String::new(), ports: None });
                    k.trim()
                } else {
                    key
                };
                let rule = p.rules.last_mut().ok_or_else(bad)?;
                match key {
                    "from" => rule.from = unquote(value),
                    "to" => rule.to = unquote(value),
                    "ports" => rule.ports = Some(flow_list(value).ok_or_else(bad)?),
                    _ => return Err(bad()),
                }
            }
            _ => return Err(bad()),
        }
    }
    if p.rules.iter().any(|r| r.from.is_empty() || r.to.is_empty()) {
        bail!("policy: an allow rule lacks `from` or `to`");
    }
    Ok(p)
}

/// Whether one port spec (`8000/tcp`, `9000-9100/tcp`, `tcp`) covers `port`/`proto`.
fn spec_covers(spec: &str, port: u16, proto: &str) -> bool {
    match spec.split_once('/') {
        None => spec == proto,
        Some((range, p)) => {
            p == proto
                && match range.split_once('-') {
                    Some((lo, hi)) => lo.parse::<u16>().is_ok_and(|lo| lo <= port) && hi.parse::<u16>().is_ok_and(|hi| port <= hi),
                    None => range.parse::<u16>() == Ok(port),
                }
        }
    }
}

impl Policy {
    pub fn segment(&self, name: &str) -> Option<&Segment> {
        self.segments.iter().find(|s| s.name == name)
    }

    /// Whether a rule allows `from` -> `to` on `port`/`proto`.
    pub fn allows(&self, from: &str, to: &str, port: u16, proto: &str) -> bool {
        self.rules
            .iter()
            .any(|r| r.from == from && r.to == to && r.ports.as_ref().is_none_or(|ps| ps.iter().any(|s| spec_covers(s, port, proto))))
    }

    /// A would-be denial between two labeled segments is only audited when
    /// both ends are in audit mode.
    pub fn audited(&self, a: &str, b: &str) -> bool {
        let audit_of = |s: &str| self.segment(s).and_then(|s| s.audit).unwrap_or(self.audit);
        audit_of(a) && audit_of(b)
    }

    /// The cgroup (relative to the cgroup2 mount) the demo makes for a
    /// cgroup segment: its glob `ai.slice/<name>*` without the star.
    pub fn cgroup_dir(&self, name: &str) -> anyhow::Result<String> {
        let seg = self.segment(name).ok_or_else(|| anyhow::anyhow!("the policy has no segment `{name}`"))?;
        match seg.cgroups.as_slice() {
            [glob]
                if glob.starts_with("ai.slice/")
                    && !glob["ai.slice/".len()..].trim_end_matches('*').contains(['/', '*', '?', '['])
                    && !glob["ai.slice/".len()..].trim_end_matches('*').is_empty() =>
            {
                Ok(glob.trim_end_matches('*').to_string())
            }
            other => bail!(
                "segment `{name}` selects cgroups {other:?}; the demo expects one glob `ai.slice/<name>*` (as in policies/ai-reference.yaml)"
            ),
        }
    }
}

/// `policy` with `spec.mode: audit` (the one `  mode: …` line under `spec:`).
pub fn audit_copy(text: &str) -> anyhow::Result<String> {
    let mut in_spec = false;
    let mut done = false;
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        let code = strip_comment(line);
        if !code.starts_with(' ') && !code.trim().is_empty() {
            in_spec = code.trim_end() == "spec:";
        }
        if in_spec && !done && code.starts_with("  mode:") && !code.starts_with("   ") {
            out.push_str("  mode: audit\n");
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !done {
        // No mode line: audit goes first under spec.
        let Some(at) = out.find("\nspec:\n") else { bail!("the policy has no `spec:` section") };
        out.insert_str(at + "\nspec:\n".len(), "  mode: audit\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/ai-reference.yaml")).unwrap()
    }

    #[test]
    fn reads_the_reference_policy() {
        let p = parse(&reference()).unwrap();
        assert!(!p.audit);
        let names: Vec<_> = p.segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["orchestrator", "inference", "retrieval", "conversation-store", "gateway", "enterprise"]);
        assert_eq!(p.cgroup_dir("conversation-store").unwrap(), "ai.slice/conversation-store");
        assert_eq!(p.segment("enterprise").unwrap().cidrs, ["198.18.40.0/24", "fd5a:7a1e:40::/64"]);
        assert!(p.allows("orchestrator", "inference", 8000, "tcp"));
        assert!(!p.allows("orchestrator", "inference", 8000, "udp"));
        assert!(p.allows("gateway", "enterprise", 443, "tcp"));
        assert!(!p.allows("orchestrator", "enterprise", 80, "tcp"));
        assert!(!p.allows("inference", "conversation-store", 6379, "tcp"));
    }

    #[test]
    fn audit_copy_switches_only_spec_mode() {
        let text = audit_copy(&reference()).unwrap();
        let p = parse(&text).unwrap();
        assert!(p.audit && p.audited("inference", "enterprise"));
        assert_eq!(text.matches("mode: audit").count(), reference().matches("mode: audit").count() + 1);
    }

    #[test]
    fn port_specs() {
        assert!(spec_covers("9000-9100/tcp", 9050, "tcp"));
        assert!(!spec_covers("9000-9100/tcp", 9101, "tcp"));
        assert!(spec_covers("udp", 53, "udp"));
        assert!(!spec_covers("udp", 53, "tcp"));
    }
}
