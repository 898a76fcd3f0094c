//! Facts about this host that several tasks need: one copy each.
use std::path::PathBuf;

use anyhow::Context as _;

unsafe extern "C" {
    fn geteuid() -> u32;
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

/// Mount point of the cgroup2 hierarchy, from /proc/self/mountinfo (hybrid
/// layouts such as /sys/fs/cgroup/unified included).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    parse_cgroup2_mount(&text).context("no cgroup2 filesystem is mounted (see /proc/self/mountinfo); ztai needs cgroup v2")
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2").then(|| pre.split_whitespace().nth(4).map(unescape_octal))?
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout_with_escapes() {
        let text = "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/my\\040cg rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(text), Some(PathBuf::from("/sys/fs/my cg")));
        assert_eq!(parse_cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }
}
