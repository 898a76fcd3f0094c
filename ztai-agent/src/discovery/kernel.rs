//! What the running kernel offers, checked before anything is loaded, so an
//! old kernel gets a refusal that names the missing feature and the version
//! that has it instead of a verifier dump.

/// Features ztai needs, with the release that introduced each.
pub const REQUIRED: &[(&str, (u32, u32))] = &[
    ("cgroup connect/sendmsg hooks (BPF_CGROUP_INET*_CONNECT, UDP*_SENDMSG)", (4, 18)),
    ("recvmsg hooks for UDP replies (BPF_CGROUP_UDP*_RECVMSG)", (5, 2)),
    ("bpf_link attachment to cgroups (BPF_LINK_CREATE)", (5, 7)),
    ("BPF ring buffer for violation events (BPF_MAP_TYPE_RINGBUF)", (5, 8)),
    ("socket release hook (BPF_CGROUP_INET_SOCK_RELEASE)", (5, 9)),
    ("network namespace cookies from userspace (SO_NETNS_COOKIE)", (5, 14)),
];

/// The oldest kernel the integration suite passes on (`cargo xtask vm-test`,
/// in CI). Between the feature floor and this, the agent runs but says so.
pub const OLDEST_TESTED: (u32, u32) = (6, 1);

/// A kernel that has every required feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSupport {
    Tested,
    /// Has the features, but is older than [`OLDEST_TESTED`].
    Untested { release: String },
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("this kernel ({release}) lacks {feature}, which ztai needs; it arrived in Linux {major}.{minor}")]
    TooOld { release: String, feature: &'static str, major: u32, minor: u32 },
    #[error("cannot read the kernel release (uname)")]
    Uname,
}

/// "6.18.0-1-amd64" → (6, 18).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub fn release() -> Option<String> {
    // SAFETY: uname fills a zeroed struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The first required feature `version` lacks, if any.
pub fn missing(version: (u32, u32)) -> Option<(&'static str, (u32, u32))> {
    REQUIRED.iter().copied().find(|(_, need)| version < *need)
}

pub fn support(release: &str) -> Result<KernelSupport, KernelError> {
    let version = parse_release(release).ok_or(KernelError::Uname)?;
    match missing(version) {
        Some((feature, (major, minor))) => {
            Err(KernelError::TooOld { release: release.to_string(), feature, major, minor })
        }
        None if version < OLDEST_TESTED => Ok(KernelSupport::Untested { release: release.to_string() }),
        None => Ok(KernelSupport::Tested),
    }
}

/// The running kernel's [`support`].
pub fn check() -> Result<KernelSupport, KernelError> {
    support(&release().ok_or(KernelError::Uname)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.10.0-35-cloud-amd64"), Some((5, 10)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn an_old_kernel_is_refused_naming_the_feature_and_version() {
        let (feature, version) = missing((5, 10)).expect("5.10 lacks SO_NETNS_COOKIE");
        assert!(feature.contains("SO_NETNS_COOKIE"));
        assert_eq!(version, (5, 14));
        assert_eq!(missing((4, 19)).map(|(_, v)| v), Some((5, 2)));
        assert_eq!(missing((6, 1)), None);
    }

    #[test]
    fn between_the_floor_and_the_oldest_tested_kernel_runs_untested() {
        assert!(matches!(support("5.15.0-1-amd64"), Ok(KernelSupport::Untested { .. })));
        assert_eq!(support("6.1.0-40-cloud-amd64").ok(), Some(KernelSupport::Tested));
        assert!(matches!(support("5.10.0-35-cloud-amd64"), Err(KernelError::TooOld { major: 5, minor: 14, .. })));
        assert!(matches!(support("garbage"), Err(KernelError::Uname)));
    }

    #[test]
    fn this_kernel_passes() {
        check().expect("the test machine runs a supported kernel");
    }
}
