//! The measurements. Each comparison runs its configurations in turn within
//! one repetition (rotating the order between repetitions), so slow drifts of
//! a shared machine spread over all of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use super::agent::{self, Agent, ProcStats};
use super::bpf;
use super::cgroup::{self, BenchCgroup};
use super::child::{self, Proc};
use super::nft::NftTable;
use super::policy::{self, BULK_PORT, CONN_PORT, PLAIN_PORT, STORM_PORT, Size, UDP_PORT};
use super::profile::{self, Profile};
use super::stats::Samples;
use super::sys;

const READY_TIMEOUT: Duration = Duration::from_secs(120);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Params {
    pub reps: usize,
    pub conn_n: u64,
    pub conn_warm: u64,
    /// Policy sizes of the connection comparison (ztai and nftables sets).
    pub sizes: Vec<Size>,
    /// Sizes for the linear-chain nftables variant.
    pub naive_sizes: Vec<Size>,
    pub bulk_secs: u64,
    pub udp_n: u64,
    pub udp_warm: u64,
    pub udp_size: usize,
    pub apply_sizes: Vec<Size>,
    pub apply_reps: usize,
    pub reloads: usize,
    pub cgroup_tries: usize,
    pub idle: Duration,
    pub storm: Duration,
    /// Denied connects per second the storm aims at: well above what the
    /// agent can report, without taking all of a small machine's CPU from it.
    pub storm_rate: u64,
    pub bpf_conn_n: u64,
    pub bpf_udp_n: u64,
    pub bpf_reps: usize,
    /// Connections per profiled configuration.
    pub profile_n: u64,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        let grid = |rules: &[usize], segs: &[usize]| -> Vec<Size> {
            segs.iter()
                .flat_map(|&s| {
                    rules.iter().map(move |&r| Size {
                        rules: r,
                        segments: s,
                    })
                })
                .collect()
        };
        if quick {
            Params {
                reps: 1,
                conn_n: 300,
                conn_warm: 50,
                sizes: grid(&[10, 100], &[10]),
                naive_sizes: grid(&[10, 100], &[10]),
                bulk_secs: 1,
                udp_n: 5_000,
                udp_warm: 500,
                udp_size: 64,
                apply_sizes: grid(&[10, 100], &[10]),
                apply_reps: 1,
                reloads: 1,
                cgroup_tries: 5,
                idle: Duration::from_millis(300),
                storm: Duration::from_millis(500),
                storm_rate: 600_000,
                bpf_conn_n: 300,
                bpf_udp_n: 3_000,
                bpf_reps: 1,
                profile_n: 1_000,
            }
        } else {
            Params {
                reps: 5,
                conn_n: 10_000,
                conn_warm: 1_000,
                sizes: grid(&[10, 1_000, 10_000], &[10, 1_000]),
                naive_sizes: grid(&[10, 1_000, 10_000], &[10, 1_000]),
                bulk_secs: 3,
                udp_n: 300_000,
                udp_warm: 10_000,
                udp_size: 64,
                apply_sizes: [
                    grid(&[10, 100, 1_000, 10_000], &[10]),
                    grid(&[10, 10_000], &[1_000]),
                ]
                .concat(),
                apply_reps: 3,
                reloads: 3,
                cgroup_tries: 50,
                idle: Duration::from_secs(3),
                storm: Duration::from_secs(3),
                storm_rate: 600_000,
                bpf_conn_n: 20_000,
                bpf_udp_n: 100_000,
                bpf_reps: 5,
                profile_n: 60_000,
            }
        }
    }

    pub fn smallest(&self) -> Size {
        self.sizes[0]
    }

    pub fn largest(&self) -> Size {
        *self
            .sizes
            .iter()
            .max_by_key(|s| (s.rules, s.segments))
            .expect("sizes")
    }

    pub fn max_segments(&self) -> usize {
        self.sizes
            .iter()
            .chain(&self.apply_sizes)
            .map(|s| s.segments)
            .max()
            .unwrap_or(10)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Config {
    Base,
    Ztai(Size),
    NftSets(Size),
    NftNaive(Size),
}

impl Config {
    pub fn kind(&self) -> &'static str {
        match self {
            Config::Base => "no programs",
            Config::Ztai(_) => "ztai",
            Config::NftSets(_) => "nftables sets",
            Config::NftNaive(_) => "nftables naive",
        }
    }

    pub fn size(&self) -> Option<Size> {
        match *self {
            Config::Base => None,
            Config::Ztai(s) | Config::NftSets(s) | Config::NftNaive(s) => Some(s),
        }
    }

    pub fn label(&self) -> String {
        match self.size() {
            None => self.kind().to_string(),
            Some(s) => format!("{} ({s})", self.kind()),
        }
    }
}

/// Everything measured, for the report.
#[derive(Default)]
pub struct Results {
    /// µs per connection.
    pub conn: BTreeMap<Config, Samples>,
    /// Per configuration: its time ÷ that of the no-programs run just before it.
    pub conn_ratio: BTreeMap<Config, Samples>,
    pub bulk_ratio: BTreeMap<Config, Samples>,
    pub udp_ratio: BTreeMap<Config, Samples>,
    /// µs per connection over the whole run (stalls included).
    pub conn_mean: BTreeMap<Config, Samples>,
    /// Connects refused (RST to the SYN) and retried, over all repetitions.
    pub conn_refused: BTreeMap<Config, u64>,
    /// Chunks slower than twice their run's median chunk.
    pub conn_stalled: BTreeMap<Config, u64>,
    pub udp_stalled: BTreeMap<Config, u64>,
    /// Gbit/s.
    pub bulk: BTreeMap<Config, Samples>,
    pub bulk_tool: String,
    /// Datagrams sent per second, and the fraction received.
    pub udp: BTreeMap<Config, (Samples, Samples)>,
    pub apply: BTreeMap<Size, ApplyResult>,
    pub cgroup_latency: Option<LatencyResult>,
    pub agent: Option<AgentResult>,
    pub bpf: BTreeMap<Size, BpfResult>,
    pub foreign_programs: usize,
    /// Per configuration: the perf profile and the connections it covers.
    pub profiles: BTreeMap<Config, (Profile, u64)>,
    /// Agent CPU profiles: (what, profile, seconds recorded).
    pub agent_profiles: Vec<(String, profile::ProcessProfile, f64)>,
    pub notes: Vec<String>,
}

#[derive(Default)]
pub struct ApplyResult {
    /// Agent start to the "ready" line, ms.
    pub start_ready: Samples,
    /// SIGHUP to the "policy applied" line, ms.
    pub reload: Samples,
    /// `ztai-agent check` of the same file (parse + validate only), ms.
    pub check: Samples,
    /// Agent RSS after ready, MiB.
    pub rss_mib: Samples,
    /// Peak RSS of that `check` process, MiB.
    pub check_rss_mib: Samples,
    /// Agent CPU while idle after the reloads (first repetition), % of one CPU.
    pub idle_cpu_pct: Samples,
}

pub struct LatencyResult {
    /// (setting, mkdir to the first denied connect in ms, tries not enforced within 3 s).
    pub variants: Vec<(String, Samples, usize)>,
}

pub struct AgentResult {
    pub idle_cpu_pct: f64,
    pub idle_rss_mib: f64,
    pub storm_secs: f64,
    pub storm_attempts: u64,
    pub storm_denied: u64,
    pub storm_cpu_pct: f64,
    pub storm_rss_mib: f64,
    pub peak_rss_mib: f64,
    /// Violation lines printed during the storm window.
    pub printed_in_window: u64,
    /// ... and in total once the agent caught up.
    pub printed_total: u64,
    pub dropped: u64,
    pub kernel_denied: u64,
    pub write_syscalls_per_event: f64,
    pub cpu_us_per_event: f64,
    pub sample_line: Option<String>,
}

#[derive(Default)]
pub struct BpfResult {
    /// Program name -> (ns per run, runs per connection) during the TCP loop.
    pub tcp: BTreeMap<String, (Samples, Samples)>,
    /// ... and per datagram during the UDP loop.
    pub udp: BTreeMap<String, (Samples, Samples)>,
    /// Sum of all programs' run time per connection, ns.
    pub ns_per_conn: Samples,
    pub ns_per_datagram: Samples,
    /// Program -> callee -> call sites in its verified code.
    pub static_calls: BTreeMap<String, BTreeMap<String, u64>>,
}

pub struct Bench {
    pub p: Params,
    pub agent_bin: PathBuf,
    pub cg: BenchCgroup,
    pub dir: TempDir,
    pub have_nft: bool,
    pub have_iperf3: bool,
    pub have_bpftool: bool,
    pub r: Results,
    plain: Option<Proc>,
}

/// A private folder for policy files and rulesets; removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("ztai-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a configuration leaves in place while it is measured.
enum Active {
    None,
    Agent(Box<Agent>),
    Nft(NftTable),
}

fn check_interrupt() -> anyhow::Result<()> {
    if sys::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Chunks per timed loop (see the clients in `child`).
const CHUNKS: u64 = 20;

/// One timed connection loop.
struct Timed {
    /// Median over the loop's chunks of the time per connection.
    per_op_us: f64,
    /// Whole loop, stalls included.
    mean_us: f64,
    stalled: u64,
    refused: u64,
}

/// The comma-separated per-operation times (ns) of a client's chunks.
fn chunk_samples(v: &[String], i: usize) -> anyhow::Result<Samples> {
    let list = v.get(i).ok_or_else(|| anyhow!("no chunk times in {v:?}"))?;
    let mut s = Samples::default();
    for x in list.split(',') {
        s.push(x.parse().with_context(|| format!("bad chunk time {x:?}"))?);
    }
    Ok(s)
}

/// Chunks slower than twice the median chunk: something else took the CPU.
fn stalled(chunks: &Samples) -> u64 {
    let m = chunks.median();
    chunks.0.iter().filter(|&&c| c > 2.0 * m).count() as u64
}

fn num(v: &[String], i: usize) -> anyhow::Result<f64> {
    v.get(i)
        .ok_or_else(|| anyhow!("short answer {v:?}"))?
        .parse()
        .with_context(|| format!("bad number in {v:?}"))
}

impl Bench {
    pub fn new(
        quick: bool,
        agent_bin: PathBuf,
        have_nft: bool,
        have_iperf3: bool,
        have_bpftool: bool,
    ) -> anyhow::Result<Bench> {
        let p = Params::new(quick);
        let cg = BenchCgroup::create()?;
        for name in ["client", "server", "plain", "hold"] {
            cg.child(name)?;
        }
        let fillers = policy::spec(
            Size {
                rules: 1,
                segments: p.max_segments(),
            },
            false,
        );
        for s in fillers.cgroups() {
            cg.child(s)?;
        }
        Ok(Bench {
            p,
            agent_bin,
            cg,
            dir: TempDir::new()?,
            have_nft,
            have_iperf3,
            have_bpftool,
            r: Results::default(),
            plain: None,
        })
    }

    fn cgroup(&self, name: &str) -> PathBuf {
        self.cg.path().join(name)
    }

    fn policy_file(&self, size: Size, late: bool) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!(
            "ztai-{}-{}{}.yaml",
            size.rules,
            size.segments,
            if late { "-late" } else { "" }
        ));
        if !path.exists() {
            let text = policy::spec(size, late).ztai_yaml(self.cg.rel());
            std::fs::write(&path, text)
                .with_context(|| format!("cannot write {}", path.display()))?;
            // Every generated policy must pass the agent's own check.
            let out = std::process::Command::new(&self.agent_bin)
                .arg("check")
                .arg(&path)
                .output()?;
            if !out.status.success() {
                bail!(
                    "generated policy {} fails `ztai-agent check`: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(path)
    }

    fn nft_file(&self, size: Size, naive: bool) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!(
            "nft-{}-{}-{}.nft",
            if naive { "naive" } else { "sets" },
            size.rules,
            size.segments
        ));
        if !path.exists() {
            let spec = policy::spec(size, false);
            let text = if naive {
                spec.nft_naive(self.cg.rel())
            } else {
                spec.nft_sets(self.cg.rel())
            };
            std::fs::write(&path, text)?;
        }
        Ok(path)
    }

    fn start_agent(&self, size: Size, late: bool) -> anyhow::Result<(Agent, Duration)> {
        let file = self.policy_file(size, late)?;
        let agent = Agent::start(&self.agent_bin, &file, &self.cg.path())?;
        let (took, _) = agent.wait_ready(READY_TIMEOUT)?;
        // The agent installs its signal handlers just after logging "ready".
        std::thread::sleep(Duration::from_millis(200));
        Ok((agent, took))
    }

    /// Moves the bench (and so everything it starts from now on) into a new
    /// network namespace, with the unlabeled listener started again there:
    /// nothing one configuration leaves behind (conntrack entries, sockets
    /// closing) reaches the next. The old namespace goes with its last process.
    pub fn fresh_netns(&mut self) -> anyhow::Result<()> {
        self.plain = None;
        sys::enter_private_netns().context("cannot create a private network namespace")?;
        self.start_plain_listener()
    }

    fn activate(&mut self, cfg: Config) -> anyhow::Result<Active> {
        self.fresh_netns()?;
        self.attach(cfg)
    }

    /// Enforcement for `cfg` in the current network namespace.
    fn attach(&self, cfg: Config) -> anyhow::Result<Active> {
        Ok(match cfg {
            Config::Base => Active::None,
            Config::Ztai(size) => Active::Agent(Box::new(self.start_agent(size, false)?.0)),
            Config::NftSets(size) => Active::Nft(NftTable::load(
                &self.nft_file(size, false)?,
                self.cg.mount(),
            )?),
            Config::NftNaive(size) => Active::Nft(NftTable::load(
                &self.nft_file(size, true)?,
                self.cg.mount(),
            )?),
        })
    }

    fn deactivate(&self, active: Active) -> anyhow::Result<()> {
        match active {
            Active::Agent(mut a) => a.stop(),
            Active::Nft(t) => {
                drop(t);
                Ok(())
            }
            Active::None => Ok(()),
        }
    }

    /// The unlabeled (`host`) listener labeled workloads must not reach.
    pub fn start_plain_listener(&mut self) -> anyhow::Result<()> {
        let mut p = Proc::role(
            "tcp-server",
            &self.cgroup("plain"),
            &[format!("port={PLAIN_PORT}")],
        )?;
        p.expect("ready", ANSWER_TIMEOUT)?;
        self.plain = Some(p);
        Ok(())
    }

    /// Checks that a configuration enforces what it should: `client` may not
    /// reach the unlabeled listener unless nothing is enforced.
    fn sanity(&self, cfg: Config) -> anyhow::Result<()> {
        let mut p = Proc::role(
            "check",
            &self.cgroup("client"),
            &[format!("port={PLAIN_PORT}")],
        )?;
        let (_, line) = p.line(ANSWER_TIMEOUT)?;
        let want_denied = cfg != Config::Base;
        if line.starts_with("denied") != want_denied {
            bail!(
                "{}: client -> unlabeled listener was {line:?}, expected {}",
                cfg.label(),
                if want_denied { "denied" } else { "allowed" }
            );
        }
        Ok(())
    }

    fn order<T: Copy>(items: &[T], rep: usize) -> Vec<T> {
        let mut v = items.to_vec();
        if !v.is_empty() {
            v.rotate_left(rep % items.len());
        }
        v
    }

    // ------------------------------------------------------------ 1. connections

    fn conn_once(&self, n: u64, warm: u64) -> anyhow::Result<Timed> {
        let mut server = Proc::role(
            "tcp-server",
            &self.cgroup("server"),
            &[format!("port={CONN_PORT}")],
        )?;
        server.expect("ready", ANSWER_TIMEOUT)?;
        let mut client = Proc::role(
            "tcp-client",
            &self.cgroup("client"),
            &[
                format!("port={CONN_PORT}"),
                format!("n={n}"),
                format!("warm={warm}"),
                format!("chunks={CHUNKS}"),
            ],
        )?;
        let (_, v) = client.expect(
            "ok",
            Duration::from_secs(60) + Duration::from_millis(n + warm),
        )?;
        let refused = num(&v, 2)? as u64;
        if refused * 100 > n {
            bail!("{refused} of {n} connections were refused");
        }
        let chunks = chunk_samples(&v, 3)?;
        Ok(Timed {
            per_op_us: chunks.median() / 1e3,
            mean_us: num(&v, 0)? / num(&v, 1)? / 1e3,
            stalled: stalled(&chunks),
            refused,
        })
    }

    pub fn connections(&mut self) -> anyhow::Result<()> {
        let mut configs = Vec::new();
        for &s in &self.p.sizes {
            configs.push(Config::Ztai(s));
            if self.have_nft {
                configs.push(Config::NftSets(s));
            }
        }
        if self.have_nft {
            configs.extend(self.p.naive_sizes.iter().map(|&s| Config::NftNaive(s)));
        }
        // Untimed: the first loop after start-up runs on cold caches.
        self.conn_once(self.p.conn_warm.max(100), 0)
            .map(|_| ())
            .context("warm-up connection loop")?;
        for rep in 0..self.p.reps {
            for cfg in Self::order(&configs, rep) {
                check_interrupt()?;
                // Each configuration is paired with a no-programs run made just
                // before it in the same fresh namespace: the ratio of the pair
                // survives the minutes-long slow periods of a shared machine.
                self.fresh_netns()?;
                let base = self
                    .conn_once(self.p.conn_n, self.p.conn_warm)
                    .context("connection loop, no programs (pair)")?;
                let active = self.attach(cfg)?;
                if rep == 0 {
                    self.sanity(cfg)?;
                }
                let result = self.conn_once(self.p.conn_n, self.p.conn_warm);
                self.deactivate(active)?;
                let t = result.with_context(|| format!("connection loop, {}", cfg.label()))?;
                progress(&format!(
                    "connections rep {}/{}: {:<48} {:8.2} µs/conn (mean {:.2}; pair's no-programs run {:.2}){}{}",
                    rep + 1,
                    self.p.reps,
                    cfg.label(),
                    t.per_op_us,
                    t.mean_us,
                    base.per_op_us,
                    if t.stalled > 0 {
                        format!(", {} stalled chunks", t.stalled)
                    } else {
                        String::new()
                    },
                    if t.refused > 0 {
                        format!(", {} refused and retried", t.refused)
                    } else {
                        String::new()
                    }
                ));
                for (c, x) in [(Config::Base, &base), (cfg, &t)] {
                    self.r.conn.entry(c).or_default().push(x.per_op_us);
                    self.r.conn_mean.entry(c).or_default().push(x.mean_us);
                    *self.r.conn_refused.entry(c).or_default() += x.refused;
                    *self.r.conn_stalled.entry(c).or_default() += x.stalled;
                }
                self.r
                    .conn_ratio
                    .entry(cfg)
                    .or_default()
                    .push(t.per_op_us / base.per_op_us);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ 2. bulk

    fn bulk_once(&self) -> anyhow::Result<f64> {
        let secs = self.p.bulk_secs;
        if self.have_iperf3 {
            let server = Proc::exec_in(
                &self.cgroup("server"),
                &[
                    "iperf3",
                    "-s",
                    "-1",
                    "-B",
                    "127.0.0.1",
                    "-p",
                    &BULK_PORT.to_string(),
                ]
                .map(String::from),
            )?;
            child::wait_tcp_listen(BULK_PORT, ANSWER_TIMEOUT)?;
            let client = Proc::exec_in(
                &self.cgroup("client"),
                &[
                    "iperf3",
                    "-c",
                    "127.0.0.1",
                    "-p",
                    &BULK_PORT.to_string(),
                    "-t",
                    &secs.to_string(),
                    "-J",
                ]
                .map(String::from),
            )?;
            let out = client.output(Duration::from_secs(secs + 30))?;
            drop(server);
            let v: Value = serde_json::from_str(out.trim())
                .map_err(|_| anyhow!("iperf3 -J printed no JSON:\n{out}"))?;
            // The median one-second interval: a stall of the shared machine
            // spoils an interval, not the run.
            let mut per_second = Samples::default();
            for i in v["intervals"].as_array().into_iter().flatten() {
                if let Some(b) = i.pointer("/sum/bits_per_second").and_then(Value::as_f64) {
                    per_second.push(b);
                }
            }
            let bps = if !per_second.0.is_empty() {
                per_second.median()
            } else {
                v.pointer("/end/sum_received/bits_per_second")
                    .and_then(Value::as_f64)
                    .ok_or_else(|| {
                        anyhow!("iperf3 result has no end.sum_received.bits_per_second")
                    })?
            };
            Ok(bps / 1e9)
        } else {
            let mut server = Proc::role(
                "bulk-server",
                &self.cgroup("server"),
                &[format!("port={BULK_PORT}")],
            )?;
            server.expect("ready", ANSWER_TIMEOUT)?;
            let mut client = Proc::role(
                "bulk-client",
                &self.cgroup("client"),
                &[format!("port={BULK_PORT}"), format!("ms={}", secs * 1000)],
            )?;
            let (_, v) = client.expect("ok", Duration::from_secs(secs + 30))?;
            Ok(num(&v, 0)? * 8.0 / num(&v, 1)?)
        }
    }

    pub fn bulk(&mut self) -> anyhow::Result<()> {
        self.r.bulk_tool = if self.have_iperf3 {
            "iperf3 (one TCP stream)".into()
        } else {
            "built-in loop (one TCP stream, 128 KiB writes)".into()
        };
        let mut configs = vec![
            Config::Ztai(self.p.smallest()),
            Config::Ztai(self.p.largest()),
        ];
        if self.have_nft {
            configs.push(Config::NftSets(self.p.smallest()));
        }
        for rep in 0..self.p.reps {
            for cfg in Self::order(&configs, rep) {
                check_interrupt()?;
                // Paired with a no-programs run just before it (see `connections`).
                self.fresh_netns()?;
                let base = self
                    .bulk_once()
                    .context("bulk throughput, no programs (pair)")?;
                let active = self.attach(cfg)?;
                let result = self.bulk_once();
                self.deactivate(active)?;
                let g = result.with_context(|| format!("bulk throughput, {}", cfg.label()))?;
                progress(&format!(
                    "bulk rep {}/{}: {:<48} {g:8.2} Gbit/s (pair's no-programs run {base:.2})",
                    rep + 1,
                    self.p.reps,
                    cfg.label()
                ));
                self.r.bulk.entry(Config::Base).or_default().push(base);
                self.r.bulk.entry(cfg).or_default().push(g);
                self.r.bulk_ratio.entry(cfg).or_default().push(g / base);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ 3. UDP

    /// Datagrams per second (median chunk), fraction received, stalled chunks.
    fn udp_once(&self) -> anyhow::Result<(f64, f64, u64)> {
        let mut server = Proc::role(
            "udp-server",
            &self.cgroup("server"),
            &[format!("port={UDP_PORT}")],
        )?;
        server.expect("ready", ANSWER_TIMEOUT)?;
        let (n, warm) = (self.p.udp_n, self.p.udp_warm);
        let mut client = Proc::role(
            "udp-client",
            &self.cgroup("client"),
            &[
                format!("port={UDP_PORT}"),
                format!("n={n}"),
                format!("warm={warm}"),
                format!("size={}", self.p.udp_size),
                format!("chunks={CHUNKS}"),
            ],
        )?;
        let (_, v) = client.expect("ok", Duration::from_secs(120))?;
        let errors = num(&v, 2)?;
        if errors > 0.0 {
            bail!("{errors} of {} datagrams failed to send", n + warm);
        }
        let chunks = chunk_samples(&v, 3)?;
        std::thread::sleep(Duration::from_millis(100));
        server.send("count")?;
        let (_, c) = server.expect("count", ANSWER_TIMEOUT)?;
        Ok((
            1e9 / chunks.median(),
            num(&c, 0)? / (n + warm) as f64,
            stalled(&chunks),
        ))
    }

    pub fn udp(&mut self) -> anyhow::Result<()> {
        let (small, large) = (self.p.smallest(), self.p.largest());
        let mut configs = vec![Config::Ztai(small), Config::Ztai(large)];
        if self.have_nft {
            configs.extend([Config::NftSets(small), Config::NftSets(large)]);
        }
        for rep in 0..self.p.reps {
            for cfg in Self::order(&configs, rep) {
                check_interrupt()?;
                // Paired with a no-programs run just before it (see `connections`).
                self.fresh_netns()?;
                let base = self.udp_once().context("UDP loop, no programs (pair)")?;
                let active = self.attach(cfg)?;
                let result = self.udp_once();
                self.deactivate(active)?;
                let (rate, delivered, stalls) =
                    result.with_context(|| format!("UDP loop, {}", cfg.label()))?;
                progress(&format!(
                    "udp rep {}/{}: {:<48} {:8.0} kdatagrams/s sent, {:.0}% received (pair's no-programs run {:.0})",
                    rep + 1,
                    self.p.reps,
                    cfg.label(),
                    rate / 1e3,
                    delivered * 100.0,
                    base.0 / 1e3
                ));
                for (c, (rate, delivered, stalls)) in
                    [(Config::Base, base), (cfg, (rate, delivered, stalls))]
                {
                    *self.r.udp_stalled.entry(c).or_default() += stalls;
                    let e = self.r.udp.entry(c).or_default();
                    e.0.push(rate);
                    e.1.push(delivered);
                }
                self.r.udp_ratio.entry(cfg).or_default().push(rate / base.0);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ 4. apply time

    pub fn apply(&mut self) -> anyhow::Result<()> {
        self.fresh_netns()?;
        let sizes = self.p.apply_sizes.clone();
        for rep in 0..self.p.apply_reps {
            for size in Self::order(&sizes, rep) {
                check_interrupt()?;
                let file = self.policy_file(size, false)?;
                let (ok, took, check_rss) = sys::run_measured(
                    std::process::Command::new(&self.agent_bin)
                        .arg("check")
                        .arg(&file),
                )?;
                let check_ms = ms(took);
                if !ok {
                    bail!("ztai-agent check {} failed", file.display());
                }
                let (mut agent, ready) = self.start_agent(size, false)?;
                let rss = agent.stats()?.rss_kib as f64 / 1024.0;
                let mut reloads = Vec::new();
                for _ in 0..self.p.reloads {
                    let from = agent.log_len();
                    let sent = agent.sighup()?;
                    let (at, line) = agent.wait_msg("policy applied", from, READY_TIMEOUT)?;
                    if line.get("rules").and_then(Value::as_u64) != Some(size.rules as u64) {
                        bail!("reload applied an unexpected policy: {line}");
                    }
                    reloads.push(ms(at - sent));
                    std::thread::sleep(Duration::from_millis(100));
                }
                let mut idle = None;
                if rep == 0 {
                    let tick = sys::clock_ticks_per_sec();
                    let (c0, t0) = (agent.stats()?.cpu_ticks, Instant::now());
                    std::thread::sleep(self.p.idle);
                    let c1 = agent.stats()?.cpu_ticks;
                    idle = Some((c1 - c0) as f64 / tick / t0.elapsed().as_secs_f64() * 100.0);
                }
                agent.stop()?;
                if let Some(i) = idle {
                    progress(&format!("apply: {size}: idle agent CPU {i:.1} %"));
                    self.r.apply.entry(size).or_default().idle_cpu_pct.push(i);
                }
                progress(&format!(
                    "apply rep {}/{}: {size:<34} start→ready {:7.1} ms, SIGHUP→applied {} ms, check {check_ms:.1} ms ({:.1} MiB), RSS {rss:.1} MiB",
                    rep + 1,
                    self.p.apply_reps,
                    ms(ready),
                    reloads
                        .iter()
                        .map(|r| format!("{r:.1}"))
                        .collect::<Vec<_>>()
                        .join("/"),
                    check_rss as f64 / 1024.0
                ));
                let e = self.r.apply.entry(size).or_default();
                e.start_ready.push(ms(ready));
                reloads.into_iter().for_each(|r| e.reload.push(r));
                e.check.push(check_ms);
                e.check_rss_mib.push(check_rss as f64 / 1024.0);
                e.rss_mib.push(rss);
            }
        }
        Ok(())
    }

    /// mkdir of a cgroup a segment's glob matches, to the first connect the
    /// policy denies from it. The probe process waits in an unlabeled cgroup,
    /// is moved into the new one, then connects every 200 µs. Twice: with the
    /// agent's root holding the bench's other cgroups (about 1,000), and with
    /// a root of its own that holds nothing else.
    pub fn cgroup_latency(&mut self) -> anyhow::Result<()> {
        self.fresh_netns()?;
        let crowded = self.cg.path();
        let others = std::fs::read_dir(&crowded)?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count();
        let empty = self.cg.child("lat")?;
        let mut result = LatencyResult {
            variants: Vec::new(),
        };
        for (label, root) in [
            (
                format!("{others} other cgroups under the agent's root"),
                crowded,
            ),
            ("no other cgroup under the agent's root".to_string(), empty),
        ] {
            let (samples, timeouts) = self.latency_run(&root)?;
            progress(&format!(
                "new cgroup → enforced, {label}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} tries ({timeouts} not enforced within 3 s)",
                samples.percentile(50.0),
                samples.percentile(99.0),
                samples.max(),
                samples.len()
            ));
            result.variants.push((label, samples, timeouts));
        }
        self.cg.remove_child("lat")?;
        self.r.cgroup_latency = Some(result);
        Ok(())
    }

    fn latency_run(&mut self, root: &Path) -> anyhow::Result<(Samples, usize)> {
        let rel = root
            .strip_prefix(self.cg.mount())
            .context("agent root outside the cgroup2 mount")?
            .to_string_lossy()
            .into_owned();
        let file = self
            .dir
            .path()
            .join(format!("ztai-latency-{}.yaml", rel.replace('/', "_")));
        let size = Size {
            rules: 10,
            segments: 10,
        };
        std::fs::write(&file, policy::spec(size, true).ztai_yaml(&rel))?;
        let agent = Agent::start(&self.agent_bin, &file, root)?;
        agent.wait_ready(READY_TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(200));
        let mut agent = agent;
        let hold = self.cgroup("hold");
        let mut probe = Proc::role("probe", &hold, &[format!("port={PLAIN_PORT}")])?;
        probe.expect("ready", ANSWER_TIMEOUT)?;
        let mut samples = Samples::default();
        let mut timeouts = 0;
        for i in 0..self.p.cgroup_tries {
            check_interrupt()?;
            let dir = root.join(format!("late-{i}"));
            let t0 = Instant::now();
            std::fs::create_dir(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            cgroup::move_pid(&dir, probe.pid())?;
            probe.send("go")?;
            let (t1, line) = probe.line(ANSWER_TIMEOUT)?;
            cgroup::move_pid(&hold, probe.pid())?;
            if line.starts_with("denied") {
                samples.push(ms(t1 - t0));
            } else {
                timeouts += 1;
            }
            // The agent forgets the cgroup; let it see the rmdir before the next one.
            let mut removed = false;
            for _ in 0..100 {
                if std::fs::remove_dir(&dir).is_ok() {
                    removed = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !removed {
                bail!("cannot remove cgroup {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(probe);
        agent.stop()?;
        Ok((samples, timeouts))
    }

    // ------------------------------------------------------------ 5. agent resources

    pub fn agent_resources(&mut self) -> anyhow::Result<()> {
        self.fresh_netns()?;
        let (mut agent, _) = self.start_agent(self.p.smallest(), false)?;
        let tick = sys::clock_ticks_per_sec();
        std::thread::sleep(Duration::from_millis(500));
        let s0 = agent.stats()?;
        let t0 = Instant::now();
        std::thread::sleep(self.p.idle);
        let s1 = agent.stats()?;
        let idle_cpu_pct =
            (s1.cpu_ticks - s0.cpu_ticks) as f64 / tick / t0.elapsed().as_secs_f64() * 100.0;

        check_interrupt()?;
        let m0 = agent.metrics()?;
        let dropped0 = agent::metric(&m0, "ztai_events_dropped_total", None).unwrap_or(0.0);
        let denied0 = agent::metric(&m0, "ztai_policy_verdicts_total", Some("verdict=\"deny\""))
            .unwrap_or(0.0);
        let v0 = agent.violations();
        let a0 = agent.stats()?;
        let t0 = Instant::now();
        let mut storm = Proc::role(
            "storm",
            &self.cgroup("client"),
            &[
                format!("port={STORM_PORT}"),
                format!("ms={}", self.p.storm.as_millis()),
                format!("rate={}", self.p.storm_rate),
            ],
        )?;
        let mut peak = a0.rss_kib;
        let answer = loop {
            match storm.line(Duration::from_millis(100)) {
                Ok(l) => break l,
                Err(e) if t0.elapsed() > self.p.storm + Duration::from_secs(30) => return Err(e),
                Err(_) => peak = peak.max(agent.stats().map(|s| s.rss_kib).unwrap_or(0)),
            }
        };
        let window = t0.elapsed().as_secs_f64();
        let v1 = agent.violations();
        let a1 = agent.stats()?;
        let v = answer
            .1
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>();
        if v.first().map(String::as_str) != Some("ok") {
            bail!("storm answered {:?}", answer.1);
        }
        let (attempts, denied) = (num(&v, 1)? as u64, num(&v, 2)? as u64);
        // Let the agent drain the ring buffer.
        let mut last = v1;
        let drain_start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = agent.violations();
            if now == last || drain_start.elapsed() > Duration::from_secs(20) {
                break;
            }
            last = now;
        }
        let m1 = agent.metrics()?;
        let dropped1 = agent::metric(&m1, "ztai_events_dropped_total", None).unwrap_or(0.0);
        let denied1 = agent::metric(&m1, "ztai_policy_verdicts_total", Some("verdict=\"deny\""))
            .unwrap_or(0.0);
        let a2: ProcStats = agent.stats()?;
        let printed_window = v1 - v0;
        let cpu_s = (a1.cpu_ticks - a0.cpu_ticks) as f64 / tick;
        let res = AgentResult {
            idle_cpu_pct,
            idle_rss_mib: s1.rss_kib as f64 / 1024.0,
            storm_secs: window,
            storm_attempts: attempts,
            storm_denied: denied,
            storm_cpu_pct: cpu_s / window * 100.0,
            storm_rss_mib: peak.max(a1.rss_kib) as f64 / 1024.0,
            peak_rss_mib: a2.hwm_kib as f64 / 1024.0,
            printed_in_window: printed_window,
            printed_total: last - v0,
            dropped: (dropped1 - dropped0) as u64,
            kernel_denied: (denied1 - denied0) as u64,
            write_syscalls_per_event: (a1.syscw - a0.syscw) as f64 / printed_window.max(1) as f64,
            cpu_us_per_event: cpu_s * 1e6 / printed_window.max(1) as f64,
            sample_line: agent.first_violation(),
        };
        agent.stop()?;
        progress(&format!(
            "agent: idle {:.1}% CPU {:.1} MiB; storm {:.0} denials/s, {:.0} events/s printed, {} dropped, {:.0}% CPU, {:.1} MiB",
            res.idle_cpu_pct,
            res.idle_rss_mib,
            res.storm_denied as f64 / window,
            res.printed_in_window as f64 / window,
            res.dropped,
            res.storm_cpu_pct,
            res.storm_rss_mib
        ));
        self.r.agent = Some(res);
        Ok(())
    }

    // ------------------------------------------------------------ 6. per-invocation cost

    pub fn bpf_costs(&mut self) -> anyhow::Result<()> {
        self.fresh_netns()?;
        let _stats = bpf::StatsEnabled::enable()?;
        let sizes = self.p.sizes.clone();
        for rep in 0..self.p.bpf_reps {
            for size in Self::order(&sizes, rep) {
                check_interrupt()?;
                let (mut agent, _) = self.start_agent(size, false)?;
                let progs: Vec<_> = bpf::attached(&self.cg.path(), false)?
                    .into_iter()
                    .filter(|p| p.name.starts_with("ztai_"))
                    .collect();
                if progs.is_empty() {
                    bail!(
                        "no ztai_* programs attached at {}",
                        self.cg.path().display()
                    );
                }
                let ids: Vec<u64> = progs.iter().map(|p| p.id).collect();
                if rep == 0 {
                    let e = self.r.bpf.entry(size).or_default();
                    for p in &progs {
                        e.static_calls
                            .insert(p.name.clone(), bpf::static_calls(p.id)?);
                    }
                }
                let name = |id: u64| {
                    progs
                        .iter()
                        .find(|p| p.id == id)
                        .map(|p| p.name.clone())
                        .unwrap_or_default()
                };

                let mut server = Proc::role(
                    "tcp-server",
                    &self.cgroup("server"),
                    &[format!("port={CONN_PORT}")],
                )?;
                server.expect("ready", ANSWER_TIMEOUT)?;
                let s0 = bpf::run_stats(&ids)?;
                let n = self.p.bpf_conn_n;
                let mut client = Proc::role(
                    "tcp-client",
                    &self.cgroup("client"),
                    &[
                        format!("port={CONN_PORT}"),
                        format!("n={n}"),
                        "warm=0".into(),
                    ],
                )?;
                client.expect("ok", Duration::from_secs(120))?;
                let s1 = bpf::run_stats(&ids)?;
                drop(server);

                let mut userver = Proc::role(
                    "udp-server",
                    &self.cgroup("server"),
                    &[format!("port={UDP_PORT}")],
                )?;
                userver.expect("ready", ANSWER_TIMEOUT)?;
                let s2 = bpf::run_stats(&ids)?;
                let m = self.p.bpf_udp_n;
                let mut uclient = Proc::role(
                    "udp-client",
                    &self.cgroup("client"),
                    &[
                        format!("port={UDP_PORT}"),
                        format!("n={m}"),
                        "warm=0".into(),
                        format!("size={}", self.p.udp_size),
                    ],
                )?;
                uclient.expect("ok", Duration::from_secs(120))?;
                std::thread::sleep(Duration::from_millis(100));
                let s3 = bpf::run_stats(&ids)?;
                drop(userver);
                agent.stop()?;

                let e = self.r.bpf.entry(size).or_default();
                let (mut tcp_ns, mut udp_ns) = (0u64, 0u64);
                for &id in &ids {
                    let (d_ns, d_cnt) = (s1[&id].0 - s0[&id].0, s1[&id].1 - s0[&id].1);
                    tcp_ns += d_ns;
                    if d_cnt > 0 {
                        let x = e.tcp.entry(name(id)).or_default();
                        x.0.push(d_ns as f64 / d_cnt as f64);
                        x.1.push(d_cnt as f64 / n as f64);
                    }
                    let (d_ns, d_cnt) = (s3[&id].0 - s2[&id].0, s3[&id].1 - s2[&id].1);
                    udp_ns += d_ns;
                    if d_cnt > 0 {
                        let x = e.udp.entry(name(id)).or_default();
                        x.0.push(d_ns as f64 / d_cnt as f64);
                        x.1.push(d_cnt as f64 / m as f64);
                    }
                }
                e.ns_per_conn.push(tcp_ns as f64 / n as f64);
                e.ns_per_datagram.push(udp_ns as f64 / m as f64);
                let c4 = e
                    .tcp
                    .get("ztai_connect4")
                    .map(|x| x.0.0.last().copied().unwrap_or(f64::NAN))
                    .unwrap_or(f64::NAN);
                let s4 = e
                    .udp
                    .get("ztai_sendmsg4")
                    .map(|x| x.0.0.last().copied().unwrap_or(f64::NAN))
                    .unwrap_or(f64::NAN);
                progress(&format!(
                    "bpf_stats rep {}/{}: {size:<34} connect4 {c4:6.0} ns/run, sendmsg4 {s4:6.0} ns/run, all programs {:7.0} ns/connection",
                    rep + 1,
                    self.p.bpf_reps,
                    tcp_ns as f64 / n as f64
                ));
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ profile

    /// A connection loop per configuration under `perf record -a`.
    pub fn profile(&mut self) -> anyhow::Result<()> {
        let (small, large) = (self.p.smallest(), self.p.largest());
        let mut configs = vec![Config::Ztai(small), Config::Ztai(large)];
        if self.have_nft {
            configs.extend([Config::NftSets(small), Config::NftSets(large)]);
        }
        for cfg in configs {
            check_interrupt()?;
            let active = self.activate(cfg)?;
            let result = (|| {
                let mut server = Proc::role(
                    "tcp-server",
                    &self.cgroup("server"),
                    &[format!("port={CONN_PORT}")],
                )?;
                server.expect("ready", ANSWER_TIMEOUT)?;
                let rec = profile::Recording::start(&self.dir.path().join("perf.data"))?;
                let n = self.p.profile_n;
                let mut client = Proc::role(
                    "tcp-client",
                    &self.cgroup("client"),
                    &[
                        format!("port={CONN_PORT}"),
                        format!("n={n}"),
                        "warm=0".into(),
                    ],
                )?;
                client.expect("ok", Duration::from_secs(300))?;
                let file = rec.stop()?;
                drop(server);
                let p = profile::analyze(&file)?;
                let _ = std::fs::remove_file(&file);
                Ok::<_, anyhow::Error>((p, n))
            })();
            self.deactivate(active)?;
            let (p, n) = result.with_context(|| format!("profile, {}", cfg.label()))?;
            progress(&format!(
                "profile: {:<48} {} samples; per connection: {}",
                cfg.label(),
                p.total,
                p.groups
                    .iter()
                    .filter(|(k, _)| !k.starts_with("ztai_"))
                    .map(|(k, v)| format!("{k} {:.2} µs", profile::us_per_op(*v, n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            self.r.profiles.insert(cfg, (p, n));
        }
        Ok(())
    }

    /// Where the agent's own CPU goes: a reload and idling with the largest
    /// policy, and a violation storm.
    pub fn agent_profiles(&mut self) -> anyhow::Result<()> {
        self.fresh_netns()?;
        let file = self.dir.path().join("agent.data");
        let big = *self
            .p
            .apply_sizes
            .iter()
            .max_by_key(|s| (s.segments, s.rules))
            .expect("sizes");
        let (mut agent, _) = self.start_agent(big, false)?;
        // Reload.
        let rec = profile::Recording::start_process(&file, agent.pid())?;
        let t0 = Instant::now();
        let from = agent.log_len();
        agent.sighup()?;
        agent.wait_msg("policy applied", from, READY_TIMEOUT)?;
        let secs = t0.elapsed().as_secs_f64();
        let p = profile::analyze_process(&rec.stop()?)?;
        self.r
            .agent_profiles
            .push((format!("SIGHUP reload, {big}"), p, secs));
        // Idle.
        check_interrupt()?;
        let rec = profile::Recording::start_process(&file, agent.pid())?;
        let t0 = Instant::now();
        std::thread::sleep(self.p.idle);
        let secs = t0.elapsed().as_secs_f64();
        let p = profile::analyze_process(&rec.stop()?)?;
        self.r
            .agent_profiles
            .push((format!("idle, {big}"), p, secs));
        agent.stop()?;
        // Violation storm.
        check_interrupt()?;
        let small = self.p.smallest();
        let (mut agent, _) = self.start_agent(small, false)?;
        let rec = profile::Recording::start_process(&file, agent.pid())?;
        let t0 = Instant::now();
        let mut storm = Proc::role(
            "storm",
            &self.cgroup("client"),
            &[
                format!("port={STORM_PORT}"),
                format!("ms={}", self.p.storm.as_millis()),
                format!("rate={}", self.p.storm_rate),
            ],
        )?;
        storm.expect("ok", self.p.storm + Duration::from_secs(30))?;
        let secs = t0.elapsed().as_secs_f64();
        let p = profile::analyze_process(&rec.stop()?)?;
        agent.stop()?;
        self.r
            .agent_profiles
            .push((format!("violation storm, {small}"), p, secs));
        let _ = std::fs::remove_file(&file);
        for (what, p, secs) in &self.r.agent_profiles {
            progress(&format!(
                "agent profile: {what}: {} samples in {secs:.2} s; {}",
                p.total,
                profile::top(&p.agent_fns, p.total, 3)
            ));
        }
        Ok(())
    }

    /// Programs that would run for the bench's workloads without any agent of ours
    /// (attached above the bench's cgroup by someone else).
    pub fn foreign_programs(&mut self) {
        if self.have_bpftool {
            match bpf::attached(&self.cg.path(), true) {
                Ok(p) => {
                    self.r.foreign_programs = p.len();
                    if !p.is_empty() {
                        self.r.notes.push(format!(
                            "{} cgroup BPF program(s) attached above the bench's cgroup were effective for every configuration (baseline included): {}",
                            p.len(),
                            p.iter().map(|a| format!("{} ({})", a.name, a.attach_type)).collect::<Vec<_>>().join(", ")
                        ));
                    }
                }
                Err(e) => self
                    .r
                    .notes
                    .push(format!("could not list effective cgroup programs: {e:#}")),
            }
        }
    }
}
