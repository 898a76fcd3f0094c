//! The agent's own capabilities, read before anything is loaded. Without the
//! ones it loads with, the kernel refuses the programs anyway, so their
//! absence is refused up front by name instead of with an EPERM or a verifier
//! dump. Without the others the agent still enforces but sees less, which it
//! must say (log and metric) instead of degrading silently.

/// What doing without a capability costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// The kernel refuses to load or attach the programs.
    CannotLoad,
    /// The agent enforces, but misses part of what it should see.
    SeesLess,
}

/// A capability the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needed {
    pub name: &'static str,
    /// Bits (linux/capability.h) any of which passes the kernel's check: the
    /// capability itself, then broader ones the kernel accepts in its place.
    bits: &'static [u32],
    pub cost: Cost,
    /// What the agent cannot do without it, and what that costs.
    pub consequence: &'static str,
}

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Every capability the agent needs (deploy/README.md says why, measured).
pub const NEEDED: [Needed; 6] = [
    Needed {
        name: "CAP_BPF",
        // bpf_capable(): CAP_BPF or CAP_SYS_ADMIN.
        bits: &[CAP_BPF, CAP_SYS_ADMIN],
        cost: Cost::CannotLoad,
        consequence: "eBPF maps cannot be created",
    },
    Needed {
        name: "CAP_PERFMON",
        // perfmon_capable(): CAP_PERFMON or CAP_SYS_ADMIN.
        bits: &[CAP_PERFMON, CAP_SYS_ADMIN],
        cost: Cost::CannotLoad,
        consequence: "the verifier rejects the programs' pointer handling",
    },
    Needed {
        name: "CAP_NET_ADMIN",
        bits: &[CAP_NET_ADMIN],
        cost: Cost::CannotLoad,
        consequence: "cgroup network programs cannot be loaded or attached",
    },
    Needed {
        name: "CAP_SYS_ADMIN",
        bits: &[CAP_SYS_ADMIN],
        cost: Cost::SeesLess,
        consequence: "cannot setns() into workloads' network namespaces: pod-style workloads are not identified by their addresses",
    },
    Needed {
        name: "CAP_SYS_PTRACE",
        bits: &[CAP_SYS_PTRACE],
        cost: Cost::SeesLess,
        consequence: "cannot read /proc/<pid>/fd, /proc/<pid>/ns/net or pidfd_getfd() of other users' processes: sockets bound before the agent started, and pod addresses, are missed",
    },
    Needed {
        name: "CAP_DAC_READ_SEARCH",
        // Directory permission checks also pass with CAP_DAC_OVERRIDE.
        bits: &[CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE],
        cost: Cost::SeesLess,
        consequence: "cannot list /proc/<pid>/fd of processes of other uids: sockets of non-root workloads bound before the agent started are missed",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("cannot read /proc/self/status for the agent's capabilities")]
    Read(#[source] std::io::Error),
    #[error("/proc/self/status has no CapEff line")]
    NoCapEff,
    #[error("CapEff in /proc/self/status is not a hex capability set: {value:?}")]
    BadCapEff { value: String },
    #[error("missing {missing}; nothing was loaded: run as root with the capabilities in deploy/README.md")]
    CannotLoad { missing: String },
}

/// An effective capability set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    effective: u64,
}

impl Capabilities {
    /// The `CapEff:` line of a /proc/<pid>/status text.
    pub fn parse_status(status: &str) -> Result<Self, CapabilityError> {
        let value = status.lines().find_map(|l| l.strip_prefix("CapEff:")).ok_or(CapabilityError::NoCapEff)?.trim();
        let effective = u64::from_str_radix(value, 16).map_err(|_| CapabilityError::BadCapEff { value: value.to_string() })?;
        Ok(Self { effective })
    }

    /// This process's effective set.
    pub fn own() -> Result<Self, CapabilityError> {
        let status = std::fs::read_to_string("/proc/self/status").map_err(CapabilityError::Read)?;
        Self::parse_status(&status)
    }

    /// Whether `need` (or a capability the kernel accepts instead) is held.
    pub fn has(&self, need: &Needed) -> bool {
        need.bits.iter().any(|bit| self.effective & (1u64 << bit) != 0)
    }

    /// The needed capabilities this set lacks, in [`NEEDED`] order.
    pub fn missing(&self) -> impl Iterator<Item = &'static Needed> + '_ {
        NEEDED.iter().filter(|n| !self.has(n))
    }

    /// Fails naming every missing capability the programs cannot load without.
    pub fn require_loadable(&self) -> Result<(), CapabilityError> {
        let fatal: Vec<String> =
            self.missing().filter(|n| n.cost == Cost::CannotLoad).map(|n| format!("{} ({})", n.name, n.consequence)).collect();
        if fatal.is_empty() {
            return Ok(());
        }
        Err(CapabilityError::CannotLoad { missing: fatal.join(", ") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(effective: u64) -> Capabilities {
        let status = format!("Name:\tztai-agent\nCapPrm:\t{effective:016x}\nCapEff:\t{effective:016x}\nCapBnd:\t000001ffffffffff\n");
        Capabilities::parse_status(&status).expect("valid status")
    }

    fn names(c: &Capabilities) -> Vec<&'static str> {
        c.missing().map(|n| n.name).collect()
    }

    const fn bit(cap: u32) -> u64 {
        1 << cap
    }

    /// The six of the DaemonSet and the systemd unit.
    const DEPLOYED: u64 =
        bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN) | bit(CAP_SYS_ADMIN) | bit(CAP_SYS_PTRACE) | bit(CAP_DAC_READ_SEARCH);

    #[test]
    fn the_deployed_set_and_full_root_miss_nothing() {
        assert_eq!(DEPLOYED, 0x0000_00c0_0028_1004, "the mask tests/tests/deploy.rs checks");
        for effective in [DEPLOYED, 0x0000_01ff_ffff_ffff] {
            let c = caps(effective);
            assert_eq!(names(&c), Vec::<&str>::new(), "{effective:x}");
            c.require_loadable().expect("loadable");
        }
    }

    #[test]
    fn missing_discovery_capabilities_are_named_but_do_not_stop_loading() {
        let c = caps(DEPLOYED & !bit(CAP_SYS_PTRACE) & !bit(CAP_DAC_READ_SEARCH));
        assert_eq!(names(&c), ["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"]);
        assert!(c.missing().all(|n| n.cost == Cost::SeesLess));
        c.require_loadable().expect("still loadable");
        assert_eq!(names(&caps(DEPLOYED & !bit(CAP_SYS_ADMIN))), ["CAP_SYS_ADMIN"]);
    }

    #[test]
    fn broader_capabilities_stand_in_where_the_kernel_accepts_them() {
        // SYS_ADMIN passes bpf_capable() and perfmon_capable().
        assert_eq!(names(&caps(DEPLOYED & !bit(CAP_BPF) & !bit(CAP_PERFMON))), Vec::<&str>::new());
        // DAC_OVERRIDE passes directory read/search checks.
        assert_eq!(names(&caps(DEPLOYED & !bit(CAP_DAC_READ_SEARCH) | bit(CAP_DAC_OVERRIDE))), Vec::<&str>::new());
        // Without SYS_ADMIN nothing stands in for them.
        assert_eq!(
            names(&caps(DEPLOYED & !bit(CAP_BPF) & !bit(CAP_PERFMON) & !bit(CAP_SYS_ADMIN))),
            ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"]
        );
    }

    #[test]
    fn missing_load_capabilities_are_refused_by_name() {
        let text = caps(0).require_loadable().expect_err("nothing held").to_string();
        for name in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
            assert!(text.contains(name), "{text}");
        }
        assert!(!text.contains("CAP_SYS_PTRACE"), "only what stops loading: {text}");
        // NET_ADMIN has no stand-in.
        let text = caps(DEPLOYED & !bit(CAP_NET_ADMIN)).require_loadable().expect_err("no NET_ADMIN").to_string();
        assert!(text.contains("CAP_NET_ADMIN") && !text.contains("CAP_BPF"), "{text}");
    }

    #[test]
    fn bad_status_is_an_error_not_a_panic() {
        assert!(matches!(Capabilities::parse_status("Name:\tx\n"), Err(CapabilityError::NoCapEff)));
        for bad in ["zz", "", "1ffffffffffffffff", "-1"] {
            let status = format!("CapEff:\t{bad}\n");
            assert!(matches!(Capabilities::parse_status(&status), Err(CapabilityError::BadCapEff { .. })), "{bad:?}");
        }
    }

    #[test]
    fn this_process_has_a_readable_set() {
        Capabilities::own().expect("own capabilities");
    }
}
