//! The cgroup2 mount (found in mountinfo, never assumed) and the cgroups under
//! the attach point with the segment each belongs to.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use ztai_common::{SEGMENT_HOST, SegmentId};

use crate::policy::Policy;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error("no cgroup2 filesystem is mounted (looked in /proc/self/mountinfo); ztai needs the unified cgroup hierarchy")]
    NoCgroup2,
    #[error("cgroup root {path} does not exist or is not a cgroup")]
    NotACgroup { path: PathBuf },
    #[error("cgroup root {path} is not inside the cgroup2 mount {mount}")]
    OutsideMount { path: PathBuf, mount: PathBuf },
    #[error("cannot read cgroup {path}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
}

/// Mount point of the cgroup2 filesystem. On hybrid systems that is e.g.
/// /sys/fs/cgroup/unified; on unified ones /sys/fs/cgroup.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    parse_cgroup2_mount(&text).ok_or(CgroupError::NoCgroup2)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The attach point, checked: an existing cgroup inside the cgroup2 mount.
/// `dir` may be absolute or relative to the mount.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    pub mount: PathBuf,
    pub path: PathBuf,
}

impl CgroupRoot {
    pub fn resolve(mount: &Path, dir: Option<&Path>) -> Result<Self, CgroupError> {
        let path = match dir {
            None => mount.to_path_buf(),
            Some(d) if d.is_absolute() => d.to_path_buf(),
            Some(d) => mount.join(d),
        };
        let canonical = fs::canonicalize(&path).map_err(|_| CgroupError::NotACgroup { path: path.clone() })?;
        if !canonical.join("cgroup.procs").exists() {
            return Err(CgroupError::NotACgroup { path });
        }
        let mount = fs::canonicalize(mount).map_err(|_| CgroupError::NotACgroup { path: mount.to_path_buf() })?;
        if !canonical.starts_with(&mount) {
            return Err(CgroupError::OutsideMount { path: canonical, mount });
        }
        Ok(Self { mount, path: canonical })
    }

    /// Path relative to the mount, no leading '/' ("" for the mount itself).
    pub fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.mount).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

/// A cgroup and the segment it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabeledCgroup {
    /// The kernel's cgroup id: the inode of its cgroup2 directory.
    pub id: u64,
    /// Relative to the cgroup2 mount, no leading '/'.
    pub rel_path: String,
    pub segment: SegmentId,
    /// Other segments whose selectors also match (a policy ambiguity to warn about).
    pub also_matched: Vec<SegmentId>,
}

/// Segment of a cgroup path: the first segment (file order) whose selector
/// matches it, else that of its nearest matching ancestor, else `host`.
pub fn segment_of(policy: &Policy, rel_path: &str) -> (SegmentId, Vec<SegmentId>) {
    let mut path = rel_path;
    loop {
        let matches = policy.segments_matching_cgroup(path);
        if let Some((first, rest)) = matches.split_first() {
            return (*first, rest.to_vec());
        }
        match path.rsplit_once('/') {
            Some((parent, _)) => path = parent,
            None if !path.is_empty() => path = "",
            None => return (SEGMENT_HOST, Vec::new()),
        }
    }
}

/// A policy's cgroup selectors as one glob set, with answers remembered by
/// cgroup id: a cgroup's path never changes (cgroup v2 forbids renaming), so
/// each cgroup is matched once per policy, not on every rescan.
pub struct SegmentMatcher {
    set: globset::GlobSet,
    /// Segment of each glob in `set`, in file order.
    owners: Vec<SegmentId>,
    known: std::collections::HashMap<u64, (SegmentId, Vec<SegmentId>)>,
}

impl SegmentMatcher {
    pub fn new(policy: &Policy) -> Self {
        let mut builder = globset::GlobSetBuilder::new();
        let mut owners = Vec::new();
        for segment in &policy.segments {
            for selector in &segment.cgroups {
                // Same options as the parser, which already rejected bad globs.
                if let Ok(glob) = globset::GlobBuilder::new(&selector.pattern).literal_separator(true).build() {
                    builder.add(glob);
                    owners.push(segment.id);
                }
            }
        }
        let set = builder.build().unwrap_or_else(|_| globset::GlobSet::empty());
        Self { set, owners, known: std::collections::HashMap::new() }
    }

    /// Declared segments whose selectors match `rel_path`, file order.
    fn matching(&self, rel_path: &str) -> Vec<SegmentId> {
        let mut out: Vec<SegmentId> = Vec::new();
        for i in self.set.matches(rel_path) {
            let seg = self.owners[i];
            if !out.contains(&seg) {
                out.push(seg);
            }
        }
        out
    }

    /// `segment_of`, with one glob-set pass per path level.
    pub fn segment_of(&self, rel_path: &str) -> (SegmentId, Vec<SegmentId>) {
        let mut path = rel_path;
        loop {
            let matches = self.matching(path);
            if let Some((first, rest)) = matches.split_first() {
                return (*first, rest.to_vec());
            }
            match path.rsplit_once('/') {
                Some((parent, _)) => path = parent,
                None if !path.is_empty() => path = "",
                None => return (SEGMENT_HOST, Vec::new()),
            }
        }
    }

    fn cached(&mut self, id: u64, rel_path: &str) -> (SegmentId, Vec<SegmentId>) {
        if let Some(hit) = self.known.get(&id) {
            return hit.clone();
        }
        let answer = self.segment_of(rel_path);
        self.known.insert(id, answer.clone());
        answer
    }

    /// Forgets cgroups that are gone (their ids are never reused).
    fn retain(&mut self, alive: &std::collections::HashSet<u64>) {
        self.known.retain(|id, _| alive.contains(id));
    }
}

/// Every cgroup at and below the attach point, labeled. Cgroups that vanish
/// while being walked are skipped (they raced with their removal).
pub fn scan(root: &CgroupRoot, policy: &Policy) -> Result<Vec<LabeledCgroup>, CgroupError> {
    scan_with(root, &mut SegmentMatcher::new(policy))
}

/// `scan`, reusing what `matcher` already knows.
pub fn scan_with(root: &CgroupRoot, matcher: &mut SegmentMatcher) -> Result<Vec<LabeledCgroup>, CgroupError> {
    let mut out = Vec::new();
    let mut stack = vec![root.path.clone()];
    while let Some(dir) = stack.pop() {
        let meta = match fs::metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root.path => continue,
            Err(source) => return Err(CgroupError::Read { path: dir, source }),
        };
        let rel = root.relative(&dir);
        let (segment, also_matched) = matcher.cached(meta.ino(), &rel);
        out.push(LabeledCgroup { id: meta.ino(), rel_path: rel, segment, also_matched });
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(CgroupError::Read { path: dir, source }),
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    matcher.retain(&out.iter().map(|c| c.id).collect());
    Ok(out)
}

/// Pids in one cgroup (not its children).
pub fn pids_of(mount: &Path, rel_path: &str) -> Vec<i32> {
    fs::read_to_string(mount.join(rel_path).join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mi = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                  26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw\n\
                  27 25 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert_eq!(parse_cgroup2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(parse_cgroup2_mount("25 1 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"), None);
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        let mi = "26 25 0:24 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(mi), Some(PathBuf::from("/mnt/cg two")));
    }
}

#[cfg(test)]
mod matcher_tests {
    use super::*;
    use crate::policy::parse_policy_str;

    #[test]
    fn the_glob_set_agrees_with_the_policy_selector_by_selector() {
        let text = "apiVersion: ztai.dev/v1alpha1\nkind: SegmentPolicy\nmetadata: {name: t}\nspec:\n  segments:\n    a: {cgroups: [\"ai.slice/a*\", \"x/**\"]}\n    b: {cgroups: [\"ai.slice/*\"]}\n    c: {cgroups: [\"k/*/pod\"]}\n";
        let policy = parse_policy_str("t.yaml", text).expect("valid").policy;
        let m = SegmentMatcher::new(&policy);
        for path in ["ai.slice/a1", "ai.slice/b", "ai.slice/a1/w", "x/y/z", "k/p/pod", "k/p/q/pod", "other", ""] {
            assert_eq!(m.segment_of(path), segment_of(&policy, path), "{path}");
        }
    }
}
