//! Scenario helpers for ztai's integration tests.
//!
//! Every resource a test creates on the (shared) host is owned by an RAII guard that removes it
//! on drop, also when the test panics:
//!
//! * [`TestCgroup`] — a cgroup subtree `ztai-t<pid>-<n>` directly under the cgroup2 mount
//!   (never the root cgroup itself); on drop every process still in the subtree is SIGKILLed
//!   (by pid) and the directories are removed deepest-first.
//! * [`Netns`], [`Veth`], [`RemoteHost`] — a network namespace `ztai-n<pid>-<n>` joined to the
//!   host by a veth pair `zt<k>h`/`zt<k>n`, addressed only from 198.18.0.0/15 and
//!   fd5a:7a1e::/48.
//! * [`Probe`] — the `ztai-probe` client/server, optionally started inside a cgroup and/or a
//!   netns; killed and reaped on drop.
//! * [`PodNetwork`] / [`Pod`] — pod-style namespaces joined by a bridge in a separate "switch"
//!   namespace (nothing in the host namespace).
//! * [`Agent`] — `ztai-agent run --policy FILE --cgroup-root DIR`; SIGTERM (then SIGKILL) on drop.
//!
//! Nothing here sleeps for a fixed time: every wait polls a condition against a deadline and
//! fails with a message saying what it waited for.
//!
//! Declare guards in this order in a test so they drop in the reverse order:
//! `TestCgroup` / `RemoteHost` first, then the `Agent`, then the `Probe`s.

pub mod agent;
pub mod bpf;
pub mod cgroup;
pub mod expect;
pub mod forked;
pub mod lines;
pub mod metrics;
pub mod netns;
pub mod persist;
pub mod pods;
pub mod policy;
pub mod probe;
pub mod reload;
pub mod session;
pub mod time;
mod util;

pub use agent::{Agent, CliOutput, run_agent_cli};
pub use cgroup::{Cgroup, TestCgroup, cgroup2_mount};
pub use expect::{Denial, Target, assert_denial, loopback_targets};
pub use netns::{Netns, RemoteHost, Veth};
pub use pods::{Pod, PodNetwork};
pub use policy::{Policy, PolicyFile};
pub use probe::{Probe, ProbeCmd, ProbeOutcome, probe_bin};
pub use util::{TempDir, try_wait_until, unique_n, wait_until};

use std::time::Duration;

/// Default deadline for a probe run, a server to report "listening", or a violation to appear.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

/// Deadline for the agent to load its eBPF programs and log `"msg":"ready"`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the tests run with euid 0 (needed for cgroups, netns and eBPF).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The name of the running test: libtest names each test's thread after the test.
pub fn current_test_name(fallback: &str) -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_string(),
        _ => fallback.to_string(),
    }
}

/// Prints a skip notice straight to stderr: libtest captures `print!`/`eprint!` of passing
/// tests, and a skip must be visible in every run.
pub fn print_skip(test: &str, why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test} {why}");
}

/// Why the agent refuses this kernel, if it does: the agent's own check, so tests skip exactly
/// where the agent would refuse to start. Any other failure of the check (e.g. no uname) is not
/// a reason to skip: the agent then fails to start and the test fails.
pub fn kernel_refusal() -> Option<String> {
    use ztai_agent::discovery::kernel::{KernelError, check};
    match check() {
        Err(e @ KernelError::TooOld { .. }) => Some(e.to_string()),
        _ => None,
    }
}

/// Skips (returns early from) the calling test when not root, printing
/// `SKIPPED: <test> needs root (cgroup and eBPF access)`.
///
/// When running as root nothing is skipped: a failure to set up a cgroup, a netns or the agent
/// fails the test.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            $crate::print_skip(
                &$crate::current_test_name(module_path!()),
                "needs root (cgroup and eBPF access)",
            );
            return;
        }
    };
}

/// [`require_root!`], then skips when the agent refuses this kernel (it lacks a feature ztai
/// needs), printing `SKIPPED: <test> needs a kernel the agent supports: <the agent's refusal>`.
/// On a supported kernel nothing is skipped: an agent that fails to load fails the test.
#[macro_export]
macro_rules! require_agent {
    () => {
        $crate::require_root!();
        if let Some(why) = $crate::kernel_refusal() {
            $crate::print_skip(
                &$crate::current_test_name(module_path!()),
                &format!("needs a kernel the agent supports: {why}"),
            );
            return;
        }
    };
}
