//! Building `SegmentPolicy` YAML whose cgroup globs point into a test's own subtree.

use std::path::{Path, PathBuf};

use crate::Cgroup;
use crate::util::TempDir;

#[derive(Debug, Clone)]
enum Members {
    Cgroups(Vec<String>),
    Cidrs(Vec<String>),
}

#[derive(Debug, Clone)]
struct Rule {
    from: String,
    to: String,
    ports: Option<Vec<String>>,
}

/// A policy under construction. Cgroup globs are given relative to the test's subtree and are
/// written as `<subtree rel path>/<glob>` (e.g. `ztai-t123-4/orch*`).
///
/// ```text
/// apiVersion: ztai.dev/v1alpha1
/// kind: SegmentPolicy
/// metadata: {name: t}
/// spec:
///   mode: enforce
///   segments:
///     orchestrator: {cgroups: ["ztai-t123-4/orch*"]}
///     enterprise: {cidrs: ["198.18.7.0/24"]}
///   allow:
///     - {from: orchestrator, to: inference, ports: ["8000/tcp"]}
/// ```
#[derive(Debug, Clone)]
pub struct Policy {
    root: String,
    name: String,
    mode: String,
    segments: Vec<(String, Members)>,
    allow: Vec<Rule>,
    /// `segments.<name>.mode` overrides, by segment name.
    segment_modes: Vec<(String, String)>,
}

impl Policy {
    /// An enforcing policy whose cgroup globs are relative to `root` (the test's subtree).
    pub fn enforce(root: &Cgroup) -> Policy {
        Policy {
            root: root.rel_path().to_string(),
            name: "t".into(),
            mode: "enforce".into(),
            segments: Vec::new(),
            allow: Vec::new(),
            segment_modes: Vec::new(),
        }
    }

    /// Like [`Policy::enforce`] with `spec.mode: audit`.
    pub fn audit(root: &Cgroup) -> Policy {
        Policy::enforce(root).mode("audit")
    }

    /// `spec.mode: <mode>` (`enforce` or `audit`).
    pub fn mode(mut self, mode: &str) -> Policy {
        self.mode = mode.into();
        self
    }

    /// `segments.<segment>.mode: <mode>`, overriding `spec.mode` for that segment.
    pub fn segment_mode(mut self, segment: &str, mode: &str) -> Policy {
        self.segment_modes.push((segment.into(), mode.into()));
        self
    }

    /// `segments.<name>: {cgroups: ["<subtree>/<glob>", ...]}` (`*` one level, `**` any depth).
    pub fn cgroups(mut self, segment: &str, globs: &[&str]) -> Policy {
        let globs = globs
            .iter()
            .map(|g| format!("{}/{}", self.root, g))
            .collect();
        self.segments
            .push((segment.into(), Members::Cgroups(globs)));
        self
    }

    /// `segments.<name>: {cidrs: [...]}`.
    pub fn cidrs<S: AsRef<str>>(mut self, segment: &str, cidrs: &[S]) -> Policy {
        let cidrs = cidrs.iter().map(|c| c.as_ref().to_string()).collect();
        self.segments.push((segment.into(), Members::Cidrs(cidrs)));
        self
    }

    /// `allow: - {from, to, ports: [...]}` with ports like `"8000/tcp"`, `"5353/udp"`.
    pub fn allow<S: AsRef<str>>(mut self, from: &str, to: &str, ports: &[S]) -> Policy {
        let ports = ports.iter().map(|p| p.as_ref().to_string()).collect();
        self.allow.push(Rule {
            from: from.into(),
            to: to.into(),
            ports: Some(ports),
        });
        self
    }

    /// `allow: - {from, to}` — every port, tcp and udp.
    pub fn allow_all_ports(mut self, from: &str, to: &str) -> Policy {
        self.allow.push(Rule {
            from: from.into(),
            to: to.into(),
            ports: None,
        });
        self
    }

    pub fn to_yaml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).expect("string to json");
        let list = |v: &[String]| v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
        let mut y = String::new();
        y.push_str("apiVersion: ztai.dev/v1alpha1\n");
        y.push_str("kind: SegmentPolicy\n");
        y.push_str(&format!("metadata: {{name: {}}}\n", q(&self.name)));
        y.push_str("spec:\n");
        y.push_str(&format!("  mode: {}\n", self.mode));
        y.push_str("  segments:\n");
        for (name, members) in &self.segments {
            let mode = self
                .segment_modes
                .iter()
                .rev()
                .find(|(s, _)| s == name)
                .map(|(_, m)| format!(", mode: {m}"))
                .unwrap_or_default();
            match members {
                Members::Cgroups(g) => {
                    y.push_str(&format!("    {name}: {{cgroups: [{}]{mode}}}\n", list(g)))
                }
                Members::Cidrs(c) => {
                    y.push_str(&format!("    {name}: {{cidrs: [{}]{mode}}}\n", list(c)))
                }
            }
        }
        if self.allow.is_empty() {
            y.push_str("  allow: []\n");
        } else {
            y.push_str("  allow:\n");
            for r in &self.allow {
                match &r.ports {
                    Some(p) => y.push_str(&format!(
                        "    - {{from: {}, to: {}, ports: [{}]}}\n",
                        r.from,
                        r.to,
                        list(p)
                    )),
                    None => y.push_str(&format!("    - {{from: {}, to: {}}}\n", r.from, r.to)),
                }
            }
        }
        y
    }
}

/// A policy written to a private temp file, removed on drop.
#[derive(Debug)]
pub struct PolicyFile {
    _dir: TempDir,
    path: PathBuf,
    yaml: String,
}

impl PolicyFile {
    /// Writes `yaml` verbatim to `<tmp>/ztai-tests-policy-<pid>-<n>/policy.yaml`.
    pub fn write(yaml: &str) -> PolicyFile {
        let dir = TempDir::new("policy");
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, yaml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        PolicyFile {
            _dir: dir,
            path,
            yaml: yaml.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn yaml(&self) -> &str {
        &self.yaml
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_audit_modes() {
        let root = Cgroup::for_tests("ztai-t1-2");
        let y = Policy::audit(&root)
            .cgroups("a", &["a"])
            .cidrs("b", &["198.18.7.0/24"])
            .segment_mode("a", "enforce")
            .segment_mode("b", "audit")
            .to_yaml();
        assert!(y.contains("  mode: audit\n"), "{y}");
        assert!(
            y.contains("    a: {cgroups: [\"ztai-t1-2/a\"], mode: enforce}\n"),
            "{y}"
        );
        assert!(
            y.contains("    b: {cidrs: [\"198.18.7.0/24\"], mode: audit}\n"),
            "{y}"
        );
    }

    #[test]
    fn renders_the_documented_format() {
        let root = Cgroup::for_tests("ztai-t1-2");
        let y = Policy::enforce(&root)
            .cgroups("orchestrator", &["orch*"])
            .cgroups("inference", &["inf/**"])
            .cidrs("enterprise", &["198.18.7.0/24", "fd5a:7a1e:0:7::/64"])
            .allow("orchestrator", "inference", &["8000/tcp", "5353/udp"])
            .allow_all_ports("orchestrator", "enterprise")
            .to_yaml();
        assert_eq!(
            y,
            "apiVersion: ztai.dev/v1alpha1\n\
             kind: SegmentPolicy\n\
             metadata: {name: \"t\"}\n\
             spec:\n  mode: enforce\n  segments:\n\
             \x20   orchestrator: {cgroups: [\"ztai-t1-2/orch*\"]}\n\
             \x20   inference: {cgroups: [\"ztai-t1-2/inf/**\"]}\n\
             \x20   enterprise: {cidrs: [\"198.18.7.0/24\", \"fd5a:7a1e:0:7::/64\"]}\n\
             \x20 allow:\n\
             \x20   - {from: orchestrator, to: inference, ports: [\"8000/tcp\", \"5353/udp\"]}\n\
             \x20   - {from: orchestrator, to: enterprise}\n"
        );
    }
}
