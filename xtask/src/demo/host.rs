//! What the demo creates on the host, each owned by a guard that removes it on
//! drop: the cgroup subtrees, the "remote" network namespace with its veth
//! pair, the temp dir. Plus the sweep of a previous demo that was killed
//! before it could clean up, and the final check that nothing is left.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::sys::{self, FileLock};

/// Marks a cgroup subtree as the demo's own (value: the demo's pid).
const MARK: &str = "trusted.ztai-demo";
/// Name of the remote network namespace and of the veth's host end.
pub const NETNS: &str = "ztai-demo";
pub const HOST_LINK: &str = "ztai-demo";
/// The tracking subtree (outside the attach point) for the agent and the
/// processes of the remote namespace.
pub const TRACK_CGROUP: &str = "ztai-demo";
/// bpffs folders `ztai-demo-<pid>` and temp dirs `ztai-demo-<pid>`.
pub const PREFIX: &str = "ztai-demo-";
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------- cgroup2 ---

pub use crate::host::cgroup2_mount;

fn read_procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs")).map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect()).unwrap_or_default()
}

fn dirs_deepest_first(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    if root.is_dir() {
        walk(root, &mut out);
    }
    out
}

/// SIGKILLs every process in the subtree (by pid, as listed in its
/// cgroup.procs files) until none is left, then removes it deepest-first.
fn remove_subtree(root: &Path) -> Result<(), String> {
    let me = std::process::id();
    let deadline = std::time::Instant::now() + CLEANUP_TIMEOUT;
    let mut problem = String::new();
    while std::time::Instant::now() < deadline {
        if !root.exists() {
            return Ok(());
        }
        let dirs = dirs_deepest_first(root);
        let mut left = Vec::new();
        for d in &dirs {
            for pid in read_procs(d) {
                if pid != me {
                    sys::send_signal(pid, sys::SIGKILL);
                }
                left.push(pid);
            }
        }
        if left.is_empty() {
            let mut ok = true;
            for d in &dirs {
                match std::fs::remove_dir(d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        problem = format!("rmdir {}: {e}", d.display());
                        ok = false;
                        break;
                    }
                }
            }
            if ok && !root.exists() {
                return Ok(());
            }
        } else {
            problem = format!("processes still inside: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{} not removed within {CLEANUP_TIMEOUT:?}: {problem}", root.display()))
}

/// A cgroup subtree directly under the cgroup2 mount, made and marked by this
/// demo; drop kills what runs in it and removes it.
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    /// Creates `<mount>/<name>`. An existing one is refused unless it carries
    /// the demo's mark (left by a demo that was killed): then it is swept.
    pub fn create(mount: &Path, name: &str, what: &str) -> anyhow::Result<CgroupTree> {
        let root = mount.join(name);
        if root.exists() {
            match sys::get_xattr(&root, MARK) {
                Some(pid) => {
                    eprintln!("demo: removing {} left by an earlier demo (pid {pid})", root.display());
                    remove_subtree(&root).map_err(|e| anyhow::anyhow!(e))?;
                }
                None => bail!(
                    "{} already exists and is not the demo's own ({what}); the demo will not disturb it. \
                     Run the demo on a host without a real `{name}`, or remove it yourself if it is a leftover.",
                    root.display()
                ),
            }
        }
        std::fs::create_dir(&root).with_context(|| format!("cannot create cgroup {}", root.display()))?;
        let tree = CgroupTree { root };
        if let Err(e) = sys::set_xattr(&tree.root, MARK, &std::process::id().to_string()) {
            // Still ours: only a later sweep would have to refuse it.
            eprintln!("demo: warning: cannot mark {} as the demo's ({e}); if the demo is killed, remove it by hand", tree.root.display());
        }
        Ok(tree)
    }

    /// Creates the child `name` and returns its path.
    pub fn child(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.root.join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create cgroup {}", p.display()))?;
        Ok(p)
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        if let Err(e) = remove_subtree(&self.root) {
            eprintln!("demo: cleanup: {e}");
        }
    }
}

// --------------------------------------------------------------- netns ---

/// `ip ARGS`, which must succeed. Not stopped by Ctrl-C: teardown uses it too.
fn ip(args: &[&str]) -> anyhow::Result<String> {
    let (status, out, err) = sys::run_capture_cleanup(Command::new("ip").args(args), Duration::from_secs(10))?;
    if !status.success() {
        bail!("`ip {}` failed ({status}): {}", args.join(" "), err.trim());
    }
    Ok(out)
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn host_link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Pids of processes whose network namespace is the named one (compared by
/// the namespace's inode), so a namespace is never deleted under a live
/// process that would keep it alive unseen.
fn pids_in_netns(name: &str) -> Vec<u32> {
    let Ok(ino) = std::fs::metadata(Path::new("/run/netns").join(name)).map(|m| m.ino()) else { return Vec::new() };
    let want = format!("net:[{ino}]");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.to_string_lossy() == want))
                .collect()
        })
        .unwrap_or_default()
}

fn remove_netns(name: &str, link: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let killed = sys::wait_for_quiet(Duration::from_secs(10), || {
        let pids = pids_in_netns(name);
        pids.iter().for_each(|&p| sys::send_signal(p, sys::SIGKILL));
        pids.is_empty()
    });
    if !killed {
        problems.push(format!("processes still in netns {name}: {:?}", pids_in_netns(name)));
    }
    if host_link_exists(link) && ip(&["link", "del", link]).is_err() && host_link_exists(link) {
        problems.push(format!("cannot delete veth {link}"));
    }
    if netns_exists(name)
        && let Err(e) = ip(&["netns", "del", name])
    {
        problems.push(format!("{e:#}"));
    }
    problems
}

/// The enterprise's "remote host": a network namespace joined to the host by
/// a veth pair (`ztai-demo` on the host, `eth0` inside).
pub struct Remote {
    pub host_v4: String,
    pub remote_v4: String,
    pub host_v6: String,
    pub remote_v6: String,
}

impl Remote {
    /// `v4_net`/`v6_net` are the policy's enterprise cidrs (a /24 and a /64):
    /// the host end takes .1/::1, the remote end .2/::2.
    pub fn create(v4_net: &str, v6_net: &str) -> anyhow::Result<Remote> {
        let (v4_prefix, v6_prefix) = match (v4_net.strip_suffix(".0/24"), v6_net.strip_suffix("::/64")) {
            (Some(a), Some(b)) => (a, b),
            _ => bail!("the demo expects the enterprise cidrs to be one IPv4 /24 and one IPv6 /64, got {v4_net} and {v6_net}"),
        };
        let r = Remote {
            host_v4: format!("{v4_prefix}.1"),
            remote_v4: format!("{v4_prefix}.2"),
            host_v6: format!("{v6_prefix}::1"),
            remote_v6: format!("{v6_prefix}::2"),
        };
        for net in [v4_net, v6_net] {
            let used = ip(&["-o", "addr", "show", "to", net])?;
            if !used.trim().is_empty() {
                bail!("{net} (the policy's enterprise range) is already in use on this host:\n{}", sys::indent(used.trim()));
            }
        }
        ip(&["netns", "add", NETNS])?;
        ip(&["-n", NETNS, "link", "set", "lo", "up"])?;
        ip(&["link", "add", HOST_LINK, "type", "veth", "peer", "name", "eth0", "netns", NETNS])?;
        ip(&["addr", "add", &format!("{}/24", r.host_v4), "dev", HOST_LINK])?;
        ip(&["-6", "addr", "add", &format!("{}/64", r.host_v6), "dev", HOST_LINK, "nodad"])?;
        ip(&["-n", NETNS, "addr", "add", &format!("{}/24", r.remote_v4), "dev", "eth0"])?;
        ip(&["-n", NETNS, "-6", "addr", "add", &format!("{}/64", r.remote_v6), "dev", "eth0", "nodad"])?;
        ip(&["link", "set", HOST_LINK, "up"])?;
        ip(&["-n", NETNS, "link", "set", "eth0", "up"])?;
        sys::wait_for("the veth pair to come up", Duration::from_secs(10), || {
            let host_up = std::fs::read_to_string(format!("/sys/class/net/{HOST_LINK}/operstate")).is_ok_and(|s| s.trim() == "up");
            let peer_up = ip(&["-n", NETNS, "-o", "link", "show", "dev", "eth0"])?.contains("state UP");
            Ok((host_up && peer_up).then_some(()))
        })?;
        Ok(r)
    }

    /// `ip netns exec ztai-demo PROGRAM`.
    pub fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", NETNS]).arg(program);
        c
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        for p in remove_netns(NETNS, HOST_LINK) {
            eprintln!("demo: cleanup: {p}");
        }
    }
}

// ------------------------------------------------------------ temp dir ---

pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn create() -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        // Traversable by the postgres user and nginx's workers.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("demo: cleanup: cannot remove {}: {e}", self.path.display());
        }
    }
}

// -------------------------------------------------- lock, sweep, checks ---

/// The host-wide lock the integration tests use for address slot 40
/// (198.18.40.0/24 is their slot 40's subnet too), so a test and the demo
/// never share the subnet; it also keeps two demos apart.
pub fn lock() -> anyhow::Result<FileLock> {
    let path = std::env::temp_dir().join("ztai-tests-slots").join("slot-40.lock");
    sys::wait_for(
        &format!("the lock {} (held by another demo or an integration test using 198.18.40.0/24)", path.display()),
        Duration::from_secs(120),
        || FileLock::try_acquire(&path),
    )
}

/// Removes what a killed demo left behind (we hold the lock, so anything
/// with the demo's names is stale): its tracking subtree (with a still-running
/// agent), the agent's pins, the remote namespace and temp dirs. A stale
/// `ai.slice` only if it carries the demo's mark; an unmarked one is refused.
pub fn sweep_stale(mount: &Path, attach: &str, agent_bin: &Path) -> anyhow::Result<()> {
    // Refuse before touching anything when a cgroup of that name is not ours.
    for (name, what) in [(TRACK_CGROUP, "not made by this demo"), (attach, "perhaps a real slice")] {
        let p = mount.join(name);
        if p.exists() && sys::get_xattr(&p, MARK).is_none() {
            bail!(
                "{} already exists and is not the demo's own ({what}); the demo will not disturb it. \
                 Run the demo on a host without a cgroup named `{name}`, or remove it yourself if it is a leftover.",
                p.display()
            );
        }
    }
    // The tracking subtree first: it holds a still-running agent, if any.
    let track = mount.join(TRACK_CGROUP);
    if track.exists() {
        eprintln!("demo: removing {} left by an earlier demo", track.display());
        remove_subtree(&track).map_err(|e| anyhow::anyhow!(e))?;
    }
    for dir in stale_dirs(Path::new("/sys/fs/bpf")) {
        eprintln!("demo: removing pins left by an earlier demo's agent in {}", dir.display());
        let out = sys::run_capture(Command::new(agent_bin).arg("uninstall").arg("--pin-dir").arg(&dir), Duration::from_secs(30))?;
        if !out.0.success() {
            bail!("`ztai-agent uninstall --pin-dir {}` failed: {}", dir.display(), out.2.trim());
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let ai = mount.join(attach);
    if ai.exists() {
        eprintln!("demo: removing {} left by an earlier demo", ai.display());
        remove_subtree(&ai).map_err(|e| anyhow::anyhow!(e))?;
    }
    if netns_exists(NETNS) || host_link_exists(HOST_LINK) {
        eprintln!("demo: removing netns/veth {NETNS} left by an earlier demo");
        let problems = remove_netns(NETNS, HOST_LINK);
        if !problems.is_empty() {
            bail!("cannot remove the earlier demo's network namespace: {}", problems.join("; "));
        }
    }
    for dir in stale_dirs(&std::env::temp_dir()) {
        eprintln!("demo: removing {} left by an earlier demo", dir.display());
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

/// `ztai-demo-<pid>` entries of `dir` whose pid is not ours.
fn stale_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_prefix(PREFIX).and_then(|p| p.parse::<u32>().ok()).is_some_and(|pid| pid != std::process::id())
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// What this run made (so the final check never blames it for what it refused to touch).
#[derive(Default, Clone, Copy)]
pub struct Made {
    pub attach: bool,
    pub track: bool,
    pub remote: bool,
}

/// What is still there after teardown (empty = clean).
pub fn leftovers(mount: &Path, attach: &str, made: Made, pin_dir: &Path, temp: &Path) -> Vec<String> {
    let mut left = Vec::new();
    for (name, made) in [(attach, made.attach), (TRACK_CGROUP, made.track)] {
        if made && mount.join(name).exists() {
            left.push(format!("cgroup {}", mount.join(name).display()));
        }
    }
    if made.remote && netns_exists(NETNS) {
        left.push(format!("netns {NETNS}"));
    }
    if made.remote && host_link_exists(HOST_LINK) {
        left.push(format!("veth {HOST_LINK}"));
    }
    if pin_dir.exists() {
        let entries: Vec<String> = std::fs::read_dir(pin_dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        left.push(format!("pin dir {} ({} entries: {})", pin_dir.display(), entries.len(), entries.join(" ")));
    }
    if temp.exists() {
        left.push(format!("temp dir {}", temp.display()));
    }
    for (pid, start, name) in sys::started_processes() {
        if sys::still_running(pid, start) {
            left.push(format!("process {name} (pid {pid})"));
        }
    }
    left
}
