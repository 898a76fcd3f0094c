//! The reachability matrix: every segment to every other on the port its
//! service listens on, with the real clients, run from inside the source
//! segment's cgroup (the enterprise's from inside the remote namespace).
//! Each cell is judged from what the client saw plus the agent's report.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::host::Remote;
use super::packages::Tools;
use super::policy::Policy;
use super::services::{CONVERSATION_PORT, ENTERPRISE_PORT, GATEWAY_PORT, INFERENCE_PORT, Probes, RETRIEVAL_PORT};
use super::sys::{self, Placement};

/// Row order of the matrix (the enterprise is the remote, cidrs, segment).
pub const SOURCES: [&str; 6] = ["orchestrator", "inference", "retrieval", "conversation-store", "gateway", "enterprise"];
pub const REMOTE_SEGMENT: &str = "enterprise";
/// A client that has not finished by then is stopped and counted as
/// "dropped" (redis-cli has no connect timeout of its own).
const CLIENT_DEADLINE: Duration = Duration::from_secs(4);
/// Clients give up connecting after this (a dropped SYN is never answered).
const CONNECT_TIMEOUT_S: &str = "3";
/// How long violation lines may trail the client's failure.
const REPORT_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Completion,
    Sql,
    Redis,
    Gateway,
    Crm,
}

#[derive(Clone, Debug)]
pub struct Target {
    pub segment: &'static str,
    pub port: u16,
    pub kind: Kind,
    pub v6: bool,
}

impl Target {
    pub fn column(&self) -> String {
        format!("{}{}", self.segment, if self.segment == REMOTE_SEGMENT { if self.v6 { " v6" } else { " v4" } } else { "" })
    }
}

pub fn targets() -> Vec<Target> {
    let t = |segment, port, kind, v6| Target { segment, port, kind, v6 };
    vec![
        t("inference", INFERENCE_PORT, Kind::Completion, false),
        t("retrieval", RETRIEVAL_PORT, Kind::Sql, false),
        t("conversation-store", CONVERSATION_PORT, Kind::Redis, false),
        t("gateway", GATEWAY_PORT, Kind::Gateway, false),
        t("enterprise", ENTERPRISE_PORT, Kind::Crm, false),
        t("enterprise", ENTERPRISE_PORT, Kind::Crm, true),
    ]
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    Allowed,
    Eperm,
    Dropped,
    Failed,
}

impl Outcome {
    fn word(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Eperm => "EPERM",
            Outcome::Dropped => "dropped",
            Outcome::Failed => "FAILED",
        }
    }
}

/// What the policy says must happen in a cell.
#[derive(Clone, Debug)]
pub struct Expect {
    pub outcome: Outcome,
    /// (verdict, direction) of the violation line, if one must appear.
    pub line: Option<(&'static str, &'static str)>,
}

pub fn expect(policy: &Policy, src: &str, t: &Target) -> Expect {
    let inside = src != REMOTE_SEGMENT; // under the attach point: judged at connect()
    let direction = if inside { "egress" } else { "ingress" };
    if policy.allows(src, t.segment, t.port, "tcp") {
        Expect { outcome: Outcome::Allowed, line: None }
    } else if policy.audited(src, t.segment) {
        Expect { outcome: Outcome::Allowed, line: Some(("audit", direction)) }
    } else if inside {
        Expect { outcome: Outcome::Eperm, line: Some(("deny", direction)) }
    } else {
        Expect { outcome: Outcome::Dropped, line: Some(("deny", direction)) }
    }
}

pub struct Cell {
    pub src: &'static str,
    pub target: Target,
    pub client: String,
    pub pid: u32,
    pub outcome: Outcome,
    pub detail: String,
    pub elapsed: Duration,
    pub line: Option<Value>,
    pub lines: usize,
    pub expect: Expect,
    pub problems: Vec<String>,
}

impl Cell {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub struct Env<'a> {
    pub tools: &'a Tools,
    pub remote: &'a Remote,
    pub probes: &'a Probes,
    pub cgroup: &'a dyn Fn(&str) -> PathBuf,
    pub remote_cgroup: &'a Path,
}

/// The client command for one cell, and the text a correct answer contains.
fn client(env: &Env, src: &str, t: &Target) -> (Command, String, String) {
    let from_remote = src == REMOTE_SEGMENT;
    // The remote namespace sees the host at the host end of the veth.
    let local = if from_remote { env.remote.host_v4.as_str() } else { "127.0.0.1" };
    let (program, args, expect, label): (&Path, Vec<String>, String, String) = match t.kind {
        Kind::Completion => (
            &env.tools.curl,
            curl_args(&[
                "-H",
                "Content-Type: application/json",
                "-d",
                r#"{"model":"ztai-demo-tiny","prompt":"Can ticket 42 get a refund?","max_tokens":12}"#,
                &format!("http://{local}:{}/v1/completions", t.port),
            ]),
            "\"text_completion\"".into(),
            "curl POST /v1/completions".into(),
        ),
        Kind::Sql => (
            &env.tools.psql,
            vec![
                format!(
                    "host={local} port={} user=postgres dbname=ztai sslmode=disable connect_timeout={CONNECT_TIMEOUT_S} application_name=ztai-demo-{src}",
                    t.port
                ),
                "-XAtq".into(),
                "-c".into(),
                env.probes.sql.clone(),
            ],
            env.probes.sql_expect.clone(),
            "psql SELECT … ORDER BY distance".into(),
        ),
        Kind::Redis => (
            &env.tools.redis_cli,
            vec![
                "-h".into(),
                local.into(),
                "-p".into(),
                t.port.to_string(),
                "LRANGE".into(),
                env.probes.redis_key.clone(),
                "0".into(),
                "-1".into(),
            ],
            env.probes.redis_expect.clone(),
            format!("redis-cli LRANGE {}", env.probes.redis_key),
        ),
        Kind::Gateway => (
            &env.tools.curl,
            curl_args(&[&format!("http://{local}:{}/crm/customers/42", t.port)]),
            "enterprise-crm".into(),
            "curl GET /crm/customers/42".into(),
        ),
        Kind::Crm => {
            let host = if t.v6 { format!("[{}]", env.remote.remote_v6) } else { env.remote.remote_v4.clone() };
            (
                &env.tools.curl,
                curl_args(&[&format!("http://{host}:{}/crm/customers/42", t.port)]),
                "enterprise-crm".into(),
                "curl GET /crm/customers/42".into(),
            )
        }
    };
    let mut cmd = if from_remote { env.remote.exec(program) } else { Command::new(program) };
    cmd.args(&args);
    let placement = if from_remote { Placement::cgroup(env.remote_cgroup) } else { Placement::cgroup(&(env.cgroup)(src)) };
    sys::place(&mut cmd, placement);
    (cmd, expect, label)
}

fn curl_args(rest: &[&str]) -> Vec<String> {
    // -v: curl's own summary of a failed connect() omits errno; the verbose
    // line "connect to … failed: Operation not permitted" carries it.
    let mut v: Vec<String> = ["-sS", "-v", "-g", "-f", "--connect-timeout", CONNECT_TIMEOUT_S, "-m", "6"].map(String::from).to_vec();
    v.extend(rest.iter().map(|s| s.to_string()));
    v
}

struct Running {
    src: &'static str,
    target: Target,
    label: String,
    expect_text: String,
    child: std::process::Child,
    out: std::thread::JoinHandle<Vec<u8>>,
    err: std::thread::JoinHandle<Vec<u8>>,
    started: Instant,
}

/// The gist of a successful answer.
fn summary(kind: Kind, stdout: &str) -> String {
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    let text = match kind {
        Kind::Completion => {
            format!("{} {:?}", v["object"].as_str().unwrap_or("?"), v["choices"][0]["text"].as_str().unwrap_or("").trim())
        }
        Kind::Sql => format!("nearest document: {}", stdout.trim()),
        Kind::Redis => format!("history: {}", stdout.lines().map(str::trim).collect::<Vec<_>>().join(" | ")),
        Kind::Gateway | Kind::Crm => {
            let c = &v["customer"];
            format!(
                "{}: {} ({}){}",
                v["service"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("?"),
                c["tier"].as_str().unwrap_or("?"),
                v["via"].as_str().map(|via| format!(", via {via}")).unwrap_or_default()
            )
        }
    };
    if text.chars().count() > 90 { format!("{}…", text.chars().take(90).collect::<String>()) } else { text }
}

fn classify(kind: Kind, status: Option<ExitStatus>, stdout: &str, stderr: &str, expect: &str) -> (Outcome, String) {
    let first = |s: &str, pat: &[&str]| {
        s.lines().map(str::trim).find(|l| pat.iter().any(|p| l.contains(p))).map(|l| l.trim_start_matches("* ").to_string())
    };
    let Some(status) = status else {
        return (Outcome::Dropped, format!("no answer within {CLIENT_DEADLINE:?} (client stopped)"));
    };
    if status.success() && stdout.contains(expect) {
        return (Outcome::Allowed, summary(kind, stdout));
    }
    let all = format!("{stderr}\n{stdout}");
    if let Some(l) = first(&all, &["Operation not permitted"]) {
        return (Outcome::Eperm, l);
    }
    if status.code() == Some(28) || all.contains("timeout expired") || all.contains("timed out") {
        return (Outcome::Dropped, first(&all, &["timeout expired", "timed out"]).unwrap_or_else(|| "timed out".into()));
    }
    let why = first(stderr, &["error", "Error", "failed", "Could not", "curl:"])
        .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty() && !l.starts_with(['*', '>', '<', '{', '}'])).map(str::to_string))
        .unwrap_or_else(|| format!("exit {status}, answer {:?}", stdout.trim()));
    (Outcome::Failed, why)
}

/// Runs every cell at once (the dropped ones wait for their connect timeout)
/// and judges them against `policy` and the agent's violation lines.
pub fn run(env: &Env, policy: &Policy, violations: &dyn Fn() -> anyhow::Result<Vec<Value>>) -> anyhow::Result<Vec<Cell>> {
    let mut running = Vec::new();
    for src in SOURCES {
        for t in targets() {
            if t.segment == src {
                continue;
            }
            let (mut cmd, expect_text, label) = client(env, src, &t);
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start the {src} -> {} client ({label}): {e}", t.column()))?;
            let out = sys::read_all(child.stdout.take().expect("piped"));
            let err = sys::read_all(child.stderr.take().expect("piped"));
            running.push(Running { src, target: t, label, expect_text, child, out, err, started: Instant::now() });
        }
    }
    // Collect (children are killed on Ctrl-C or at the deadline).
    let mut done: Vec<Option<(Option<ExitStatus>, Duration)>> = running.iter().map(|_| None).collect();
    let result = sys::wait_for("the matrix clients", CLIENT_DEADLINE + Duration::from_secs(2), || {
        for (i, r) in running.iter_mut().enumerate() {
            if done[i].is_none() {
                if let Some(s) = r.child.try_wait()? {
                    done[i] = Some((Some(s), r.started.elapsed()));
                } else if r.started.elapsed() >= CLIENT_DEADLINE {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    done[i] = Some((None, r.started.elapsed()));
                }
            }
        }
        Ok(done.iter().all(Option::is_some).then_some(()))
    });
    if result.is_err() {
        for r in &mut running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        result?;
    }
    let mut cells = Vec::new();
    for (r, d) in running.into_iter().zip(done) {
        let (status, elapsed) = d.expect("all done");
        let pid = r.child.id();
        let stdout = String::from_utf8_lossy(&r.out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&r.err.join().unwrap_or_default()).into_owned();
        let (outcome, detail) = classify(r.target.kind, status, &stdout, &stderr, &r.expect_text);
        let expect = expect(policy, r.src, &r.target);
        cells.push(Cell {
            src: r.src,
            target: r.target,
            client: r.label,
            pid,
            outcome,
            detail,
            elapsed,
            line: None,
            lines: 0,
            expect,
            problems: Vec::new(),
        });
    }

    // Attach the agent's reports: by the client's pid for a verdict at
    // connect(), by the remote address and port for one at ingress.
    let matches = |c: &Cell, v: &Value| -> bool {
        if c.src == REMOTE_SEGMENT {
            v["direction"].as_str() == Some("ingress")
                && v["src"]["addr"].as_str() == Some(env.remote.remote_v4.as_str())
                && v["dst"]["port"].as_u64() == Some(u64::from(c.target.port))
        } else {
            v["src"]["pid"].as_u64() == Some(u64::from(c.pid))
        }
    };
    let expected_lines = cells.iter().filter(|c| c.expect.line.is_some()).count();
    let deadline = Instant::now() + REPORT_WAIT;
    let lines = loop {
        let vs = violations()?;
        let have = cells.iter().filter(|c| c.expect.line.is_some() && vs.iter().any(|v| matches(c, v))).count();
        if have == expected_lines || Instant::now() >= deadline {
            // A little longer, so unexpected extra lines show up too.
            sys::sleep(Duration::from_millis(300))?;
            break violations()?;
        }
        sys::sleep(Duration::from_millis(50))?;
    };
    for c in &mut cells {
        let mine: Vec<&Value> = lines.iter().filter(|v| matches(c, v)).collect();
        c.lines = mine.len();
        c.line = mine.first().map(|v| (*v).clone());
        judge(c);
    }
    Ok(cells)
}

fn judge(c: &mut Cell) {
    let e = c.expect.clone();
    if c.outcome != e.outcome {
        c.problems.push(format!("expected {}, got {} ({})", e.outcome.word(), c.outcome.word(), c.detail));
    }
    match (&e.line, &c.line) {
        (None, None) => {}
        (None, Some(v)) => c.problems.push(format!("the policy allows this flow, yet the agent reported it: {}", compact(v))),
        (Some((verdict, _)), None) => c.problems.push(format!("no \"verdict\":\"{verdict}\" line on the agent's stdout")),
        (Some((verdict, direction)), Some(v)) => {
            let want = [
                ("verdict", &v["verdict"], verdict.to_string()),
                ("direction", &v["direction"], direction.to_string()),
                ("proto", &v["proto"], "tcp".to_string()),
                ("src.segment", &v["src"]["segment"], c.src.to_string()),
                ("dst.segment", &v["dst"]["segment"], c.target.segment.to_string()),
            ];
            for (name, got, value) in want {
                let got = got.as_str().unwrap_or("");
                if got != value {
                    c.problems.push(format!("report has {name} {got:?}, expected {value:?}"));
                }
            }
            if v["dst"]["port"].as_u64() != Some(u64::from(c.target.port)) {
                c.problems.push(format!("report has dst.port {}, expected {}", v["dst"]["port"], c.target.port));
            }
            if v["reason"].as_str().is_none_or(str::is_empty) {
                c.problems.push("report has no reason".into());
            }
        }
    }
}

fn compact(v: &Value) -> String {
    format!(
        "verdict={} {} -> {} port {} reason={:?}",
        v["verdict"].as_str().unwrap_or("?"),
        v["src"]["segment"].as_str().unwrap_or("?"),
        v["dst"]["segment"].as_str().unwrap_or("?"),
        v["dst"]["port"].as_u64().unwrap_or(0),
        v["reason"].as_str().unwrap_or("")
    )
}

fn cell_word(c: &Cell) -> String {
    let mut w = c.outcome.word().to_string();
    if c.outcome == Outcome::Allowed && c.line.as_ref().is_some_and(|v| v["verdict"].as_str() == Some("audit")) {
        w.push_str("+audit");
    }
    format!("{w} {}", if c.ok() { "✓" } else { "✗" })
}

fn pad(s: &str, w: usize) -> String {
    let n = s.chars().count();
    if n >= w { s.to_string() } else { format!("{s}{}", " ".repeat(w - n)) }
}

pub fn print(cells: &[Cell]) {
    let cols = targets();
    let w0 = SOURCES.iter().map(|s| s.len()).max().unwrap_or(10) + 2;
    let widths: Vec<usize> = cols.iter().map(|t| t.column().len().max(16) + 2).collect();
    println!("Reachability matrix (rows: from, columns: to; ✓ = as the policy says)");
    let mut head = pad("from \\ to", w0);
    let mut ports = pad("", w0);
    for (t, w) in cols.iter().zip(&widths) {
        head.push_str(&pad(&t.column(), *w));
        ports.push_str(&pad(&format!("{}/tcp", t.port), *w));
    }
    println!("  {head}\n  {ports}");
    for src in SOURCES {
        let mut row = pad(src, w0);
        for (t, w) in cols.iter().zip(&widths) {
            let text = cells
                .iter()
                .find(|c| c.src == src && c.target.segment == t.segment && c.target.v6 == t.v6)
                .map(cell_word)
                .unwrap_or_else(|| "·".into());
            row.push_str(&pad(&text, *w));
        }
        println!("  {row}");
    }
    println!();
    println!("Cells (client run inside the source's cgroup; enterprise's from inside its network namespace)");
    let wl = cells.iter().map(|c| c.src.len() + c.target.column().len() + 4).max().unwrap_or(30) + 1;
    for c in cells {
        let flow = format!("{} -> {}", c.src, c.target.column());
        let report = match &c.line {
            Some(v) => format!(
                "{} {} {}: {}{}",
                v["verdict"].as_str().unwrap_or("?"),
                v["direction"].as_str().unwrap_or("?"),
                v["hook"].as_str().unwrap_or("?"),
                v["reason"].as_str().unwrap_or("?"),
                if c.lines > 1 { format!(" (×{})", c.lines) } else { String::new() }
            ),
            None => format!("answer: {}", if c.outcome == Outcome::Allowed { &c.detail } else { "-" }),
        };
        println!(
            "  {} {} {} {:>5}ms  {}",
            pad(&flow, wl),
            pad(&format!("{}/tcp", c.target.port), 9),
            pad(&cell_word(c), 15),
            c.elapsed.as_millis(),
            report
        );
        if c.outcome != Outcome::Allowed && c.line.is_none() || !c.ok() {
            println!("  {}   client ({}): {}", pad("", wl), c.client, c.detail);
        }
        for p in &c.problems {
            println!("  {}   ✗ {p}", pad("", wl));
        }
    }
}

/// The requirements' headline rows, as (statement, holds).
pub fn headlines(cells: &[Cell], audit: bool) -> Vec<(String, bool)> {
    let get = |src: &str, seg: &str, v6: bool| cells.iter().find(|c| c.src == src && c.target.segment == seg && c.target.v6 == v6);
    let is = |c: Option<&Cell>, o: Outcome| c.is_some_and(|c| c.outcome == o && c.ok());
    let denied = |c: Option<&Cell>| c.is_some_and(|c| c.ok() && matches!(c.outcome, Outcome::Eperm | Outcome::Dropped));
    if audit {
        let reported = cells.iter().filter(|c| c.expect.line.is_some()).count();
        return vec![
            ("every cell is allowed in audit mode".into(), cells.iter().all(|c| c.outcome == Outcome::Allowed)),
            (
                format!("each of the {reported} would-be denials is reported with \"verdict\":\"audit\""),
                cells
                    .iter()
                    .filter(|c| c.expect.line.is_some())
                    .all(|c| c.ok() && c.line.as_ref().is_some_and(|v| v["verdict"].as_str() == Some("audit"))),
            ),
            ("the flows the policy allows are not reported".into(), cells.iter().filter(|c| c.expect.line.is_none()).all(Cell::ok)),
        ];
    }
    vec![
        (
            "orchestrator reaches enterprise only through the gateway (orchestrator -> gateway allowed, gateway -> enterprise allowed, orchestrator -> enterprise denied)".into(),
            is(get("orchestrator", "gateway", false), Outcome::Allowed)
                && is(get("gateway", "enterprise", false), Outcome::Allowed)
                && is(get("gateway", "enterprise", true), Outcome::Allowed)
                && denied(get("orchestrator", "enterprise", false))
                && denied(get("orchestrator", "enterprise", true)),
        ),
        ("inference cannot reach the conversation store".into(), denied(get("inference", "conversation-store", false))),
        (
            "nothing but the gateway reaches enterprise directly".into(),
            cells.iter().filter(|c| c.target.segment == "enterprise" && c.src != "gateway").all(|c| denied(Some(c))),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    #[test]
    fn reads_a_violation_line() {
        let v: Value = serde_json::from_str(
            r#"{"verdict":"deny","src":{"segment":"inference","pid":4242,"addr":null},"dst":{"port":6379},"reason":"no rule allows a -> b tcp/6379 \u00e9\n"}"#,
        )
        .unwrap();
        assert_eq!(v["verdict"].as_str(), Some("deny"));
        assert_eq!(v["src"]["pid"].as_u64(), Some(4242));
        assert_eq!(v["src"]["addr"], Value::Null);
        assert_eq!(v["nothing"]["here"], Value::Null);
        assert_eq!(v["dst"]["port"].as_u64(), Some(6379));
        assert_eq!(v["reason"].as_str(), Some("no rule allows a -> b tcp/6379 é\n"));
        assert_eq!(super::compact(&v), "verdict=deny inference -> ? port 6379 reason=\"no rule allows a -> b tcp/6379 é\\n\"");
        assert!(serde_json::from_str::<Value>("{\"a\":1} x").is_err());
        assert_eq!(serde_json::from_str::<Value>("[1, -2.5e1, true]").unwrap(), json!([1, -25.0, true]));
    }
}
