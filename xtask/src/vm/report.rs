//! Reads what a guest printed on its console (the `ZTAI-VM-*` markers of
//! suite.sh around libtest's output) into per-kernel results.

use std::fmt::Write as _;

use serde_json::Value;

#[derive(Debug, Default, Clone)]
pub struct Binary {
    pub name: String,
    pub rc: Option<i32>,
    /// Tests that ran and passed (libtest's "passed" minus the skips).
    pub passed: u32,
    pub failed: u32,
    pub ignored: u32,
    /// Tests that printed `SKIPPED: …` (libtest counts them as passed).
    pub skipped: u32,
    pub seconds: Option<f64>,
    pub note: Option<String>,
    /// Failed tests with what libtest printed for them (panic message, captured output).
    pub failures: Vec<(String, String)>,
    pub failed_names: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum Preflight {
    Ready {
        seconds: Option<f64>,
    },
    /// The agent did not log "ready": state is `exited` or `timeout`.
    Failed {
        state: String,
        error: String,
        log: Vec<String>,
    },
}

#[derive(Debug, Default, Clone)]
pub struct Report {
    pub release: Option<String>,
    /// Guest uptime when the init reached the suite (boot time inside the guest).
    pub boot_uptime: Option<f64>,
    pub preflight: Option<Preflight>,
    /// The agent's refusal of this kernel (a feature it lacks): the suite still runs, and every
    /// test that needs the agent skips with this reason.
    pub refused: Option<String>,
    pub excluded: Vec<String>,
    pub binaries: Vec<Binary>,
    pub result_line: Option<String>,
    pub suite_seconds: Option<f64>,
    pub done: bool,
    /// Kernel panics, oopses, init problems seen on the console.
    pub problems: Vec<String>,
    pub dmesg: Vec<String>,
    /// Binary still running when the console ended (guest died or was killed).
    pub unfinished: Option<String>,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(pat.as_str()))
}

fn num<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    field(line, key).and_then(|v| v.parse().ok())
}

/// What libtest printed for one binary: outcomes and failure blocks.
fn parse_libtest(b: &mut Binary, lines: &[String]) {
    let mut cur: Option<(String, Vec<String>)> = None;
    let flush = |cur: &mut Option<(String, Vec<String>)>, b: &mut Binary| {
        if let Some((name, body)) = cur.take() {
            let text = body.join("\n").trim().to_string();
            b.failures.push((name, text));
        }
    };
    for line in lines {
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|r| r.strip_suffix(" stdout ----"))
        {
            flush(&mut cur, b);
            cur = Some((name.to_string(), Vec::new()));
        } else if line == "failures:" {
            flush(&mut cur, b);
        } else if let Some((_, body)) = cur.as_mut() {
            body.push(line.clone());
        } else if let Some((name, outcome)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.rsplit_once(" ... "))
            && outcome.trim() == "FAILED"
        {
            b.failed_names.push(name.to_string());
        }
    }
    flush(&mut cur, b);
}

pub fn parse(console: &str) -> Report {
    let mut r = Report::default();
    let mut current: Option<(Binary, Vec<String>)> = None;
    let mut in_dmesg = false;
    for raw in console.lines() {
        let line = raw.trim_end_matches('\r').to_string();
        if in_dmesg {
            if line == "ZTAI-VM-DMESG-END" {
                in_dmesg = false;
            } else {
                r.dmesg.push(line);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("ZTAI-VM-INIT ") {
            r.release = field(rest, "release").map(str::to_string);
            r.boot_uptime = num(rest, "uptime");
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-PREFLIGHT ") {
            if rest.starts_with("ready") {
                r.preflight = Some(Preflight::Ready {
                    seconds: num(rest, "seconds"),
                });
            } else {
                let state = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or("failed")
                    .to_string();
                let error = rest
                    .split_once("error=")
                    .map(|(_, e)| e.to_string())
                    .unwrap_or_default();
                let log = match r.preflight.take() {
                    Some(Preflight::Failed { log, .. }) => log,
                    _ => Vec::new(),
                };
                r.preflight = Some(Preflight::Failed { state, error, log });
            }
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-AGENT-LOG ") {
            match r.preflight.as_mut() {
                Some(Preflight::Failed { log, .. }) => log.push(rest.to_string()),
                _ => {
                    r.preflight = Some(Preflight::Failed {
                        state: String::new(),
                        error: String::new(),
                        log: vec![rest.to_string()],
                    })
                }
            }
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-REFUSED ") {
            r.refused = Some(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-EXCLUDED ") {
            r.excluded.push(rest.to_string());
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-BEGIN ") {
            let name = rest.split_whitespace().next().unwrap_or("?").to_string();
            current = Some((
                Binary {
                    name,
                    ..Default::default()
                },
                Vec::new(),
            ));
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-END ") {
            let name = rest.split_whitespace().next().unwrap_or("?").to_string();
            let (mut b, lines) = current.take().unwrap_or_else(|| {
                (
                    Binary {
                        name: name.clone(),
                        ..Default::default()
                    },
                    Vec::new(),
                )
            });
            b.rc = num(rest, "rc");
            b.skipped = num(rest, "skipped").unwrap_or(0);
            b.passed = num::<u32>(rest, "passed")
                .unwrap_or(0)
                .saturating_sub(b.skipped);
            b.failed = num(rest, "failed").unwrap_or(0);
            b.ignored = num(rest, "ignored").unwrap_or(0);
            b.seconds = num(rest, "seconds");
            b.note = field(rest, "note").map(str::to_string);
            parse_libtest(&mut b, &lines);
            r.binaries.push(b);
        } else if let Some(rest) = line.strip_prefix("ZTAI-VM-RESULT ") {
            r.result_line = Some(line.clone());
            if let Some((_, reason)) = rest.split_once("refused: ") {
                r.refused = Some(reason.to_string());
            }
            r.suite_seconds = num(rest, "seconds");
        } else if line.starts_with("ZTAI-VM-DONE") {
            r.done = true;
        } else if line == "ZTAI-VM-DMESG-BEGIN" {
            in_dmesg = true;
        } else {
            if line.starts_with("ZTAI-VM: ")
                || [
                    "Kernel panic",
                    "Oops:",
                    "BUG:",
                    "WARNING:",
                    "general protection fault",
                    "Unable to mount root",
                    "can't run '/",
                ]
                .iter()
                .any(|p| line.contains(p))
            {
                r.problems.push(line.clone());
            }
            if let Some((_, lines)) = current.as_mut() {
                lines.push(line);
            }
        }
    }
    if let Some((b, lines)) = current {
        r.unfinished = Some(b.name.clone());
        let mut b = b;
        parse_libtest(&mut b, &lines);
        b.note = Some("did not finish (the guest stopped)".into());
        r.binaries.push(b);
    }
    r
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
    Refused,
    /// No ZTAI-VM-RESULT line: boot failure, panic, or timeout.
    Broken,
}

impl Report {
    /// A refused kernel is not a failure (the refusal is the claim), but a test that fails there
    /// is: the tests that do not need the agent still run on it.
    pub fn verdict(&self) -> Verdict {
        if self.result_line.is_none() {
            Verdict::Broken
        } else if self.failed() > 0 {
            Verdict::Failed
        } else if self.refused.is_some() {
            Verdict::Refused
        } else if matches!(self.preflight, Some(Preflight::Failed { .. })) {
            Verdict::Failed
        } else {
            Verdict::Passed
        }
    }

    pub fn skipped(&self) -> u32 {
        self.binaries.iter().map(|b| b.skipped).sum()
    }

    pub fn passed(&self) -> u32 {
        self.binaries.iter().map(|b| b.passed).sum()
    }

    pub fn failed(&self) -> u32 {
        self.binaries.iter().map(|b| b.failed).sum()
    }

    pub fn ignored(&self) -> u32 {
        self.binaries.iter().map(|b| b.ignored).sum()
    }

    /// Everything that went wrong, with messages (for the final report).
    /// Full texts are in the console log; here each failed test gets its
    /// panic message and, when the agent died, the agent's own error.
    pub fn details(&self, label: &str, max_lines: usize) -> String {
        let mut s = String::new();
        if let Some(Preflight::Ready {
            seconds: Some(secs),
        }) = &self.preflight
        {
            let _ = writeln!(
                s,
                "  [{label}] start check: the agent loaded and attached its programs in {secs:.1}s"
            );
        }
        if let Some(reason) = &self.refused {
            let _ = writeln!(s, "  [{label}] refused: {reason}");
        }
        let start_error = match &self.preflight {
            Some(Preflight::Failed { state, error, log }) if self.refused.is_none() => {
                let agent = log
                    .iter()
                    .rev()
                    .find_map(|l| agent_error(l))
                    .unwrap_or_else(|| summarize_agent_error(error));
                let _ = writeln!(
                    s,
                    "  [{label}] start check: the agent did not become ready ({state}): {agent}"
                );
                Some(agent)
            }
            _ => None,
        };
        // Tests that failed only because the agent cannot start here: one line.
        let mut same_as_start = Vec::new();
        for b in &self.binaries {
            if b.failed == 0 && b.note.is_none() {
                continue;
            }
            let mut lines_for_binary = String::new();
            for (test, text) in &b.failures {
                let lines: Vec<&str> = text.lines().collect();
                let agent = lines.iter().rev().find_map(|l| agent_error(l));
                if start_error.is_some() && agent.is_some() && agent == start_error {
                    same_as_start.push(format!("{}::{test}", b.name));
                    continue;
                }
                let _ = writeln!(lines_for_binary, "    FAILED {}::{test}", b.name);
                // The panic message says why; the block before it is captured output.
                let start = lines
                    .iter()
                    .position(|l| l.contains("panicked at"))
                    .map(|i| i + 1)
                    .unwrap_or(0);
                for l in lines[start..].iter().take(max_lines) {
                    if l.is_empty() || l.starts_with("note: run with `RUST_BACKTRACE") {
                        break;
                    }
                    let _ = writeln!(lines_for_binary, "      {}", clip(l, 240));
                }
                if let Some(err) = agent {
                    let _ = writeln!(lines_for_binary, "      agent error: {err}");
                }
            }
            for n in &b.failed_names {
                if !b.failures.iter().any(|(t, _)| t == n) {
                    let _ = writeln!(
                        lines_for_binary,
                        "    FAILED {}::{n} (no message captured)",
                        b.name
                    );
                }
            }
            let _ = writeln!(
                s,
                "  [{label}] {}: {} passed, {} failed{}{}",
                b.name,
                b.passed,
                b.failed,
                b.rc.map(|rc| format!(", exit {rc}")).unwrap_or_default(),
                b.note
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
            s.push_str(&lines_for_binary);
        }
        if !same_as_start.is_empty() {
            let _ = writeln!(
                s,
                "  [{label}] {} tests failed because the agent could not start (the start check's error above):",
                same_as_start.len()
            );
            for t in &same_as_start {
                let _ = writeln!(s, "      {t}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "  [{label}] console: {}", clip(p, 240));
        }
        s
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// The agent's fatal error from one of its JSON log lines
/// (`"msg":"ztai-agent failed"`), summarized.
pub fn agent_error(line: &str) -> Option<String> {
    if !line.contains("\"ztai-agent failed\"") {
        return None;
    }
    let v: Value = serde_json::from_str(line[line.find('{')?..].trim()).ok()?;
    let e = v.get("error")?.as_str()?;
    Some(summarize_agent_error(e))
}

/// An agent error without the verifier's full log: its first part plus the
/// verifier's verdict (the line before "verification time"/"processed N insns").
pub fn summarize_agent_error(e: &str) -> String {
    let e = e.replace("\\n", "\n");
    let Some((head, log)) = e.split_once("Verifier output:") else {
        return clip(e.lines().next().unwrap_or(""), 400);
    };
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let end = lines
        .iter()
        .position(|l| {
            l.starts_with("verification time") || l.starts_with("processed ") || l.starts_with(": ")
        })
        .unwrap_or(lines.len());
    let verdict: Vec<&str> = lines[..end].iter().rev().take(2).rev().copied().collect();
    format!(
        "{} verifier: {}",
        head.trim().trim_end_matches('.'),
        verdict.join(" | ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    0.000000] Linux version 6.1.0\r
ZTAI-VM-INIT kernel=6.1 release=6.1.0-56-cloud-amd64 cpus=2 uptime=3.51\r
ZTAI-VM-PREFLIGHT ready seconds=4.2\r
ZTAI-VM-EXCLUDED metrics: python3 has no prometheus_client\r
ZTAI-VM-BEGIN harness uptime=9.0\r
\r
running 2 tests\r
test a ... ok\r
test b ... FAILED\r
\r
failures:\r
\r
---- b stdout ----\r
setup line\r
\r
thread 'b' panicked at tests/tests/harness.rs:10:5:\r
agent exited: verifier rejected\r
note: run with `RUST_BACKTRACE=1`\r
\r
\r
failures:\r
    b\r
\r
test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s\r
\r
ZTAI-VM-END harness rc=101 passed=1 failed=1 ignored=0 seconds=2.5\r
ZTAI-VM-BEGIN detach uptime=12\r
running 1 test\r
";

    #[test]
    fn reads_a_console() {
        let r = parse(LOG);
        assert_eq!(r.release.as_deref(), Some("6.1.0-56-cloud-amd64"));
        assert_eq!(r.boot_uptime, Some(3.51));
        assert!(matches!(r.preflight, Some(Preflight::Ready { seconds: Some(s) }) if s == 4.2));
        assert_eq!(
            r.excluded,
            vec!["metrics: python3 has no prometheus_client"]
        );
        let h = &r.binaries[0];
        assert_eq!((h.passed, h.failed, h.rc), (1, 1, Some(101)));
        assert_eq!(h.failures.len(), 1);
        assert_eq!(h.failures[0].0, "b");
        assert!(h.failures[0].1.contains("verifier rejected"));
        assert_eq!(h.failed_names, vec!["b"]);
        assert_eq!(r.unfinished.as_deref(), Some("detach"));
        assert_eq!(r.verdict(), Verdict::Broken);
        let d = r.details("6.1", 10);
        assert!(d.contains("FAILED harness::b"), "{d}");
        assert!(d.contains("agent exited: verifier rejected"), "{d}");
    }

    #[test]
    fn verifier_verdict() {
        let e = "the kernel rejected program p: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: 0: R1=ctx\\n557: (79) r1 = *(u64 *)(r10 -264)\\n558: (85) call bpf_get_netns_cookie#122\\nunknown func bpf_get_netns_cookie#122\\nverification time 59395 usec\\nstack depth 384+0\\n: Invalid argument (os error 22)";
        let line = serde_json::json!({"error": e, "level": "error", "msg": "ztai-agent failed"})
            .to_string();
        let s = agent_error(&line).unwrap();
        assert_eq!(
            s,
            "the kernel rejected program p: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22) verifier: \
             558: (85) call bpf_get_netns_cookie#122 | unknown func bpf_get_netns_cookie#122"
        );
        assert_eq!(summarize_agent_error("plain error"), "plain error");
    }

    #[test]
    fn reads_a_refusal() {
        let log = "ZTAI-VM-INIT kernel=5.10 release=5.10.0-46-cloud-amd64 cpus=2 uptime=2\n\
            ZTAI-VM-AGENT-LOG {\"level\":\"ERROR\",\"msg\":\"ztai-agent failed\",\"error\":\"this kernel lacks X\"}\n\
            ZTAI-VM-PREFLIGHT exited rc=1 error=this kernel (5.10.0) lacks X (SO_NETNS_COOKIE), which ztai needs; it arrived in Linux 5.14\n\
            ZTAI-VM-REFUSED this kernel (5.10.0) lacks X (SO_NETNS_COOKIE), which ztai needs; it arrived in Linux 5.14\n\
            ZTAI-VM-BEGIN audit uptime=9\n\
            test a ... SKIPPED: a needs a kernel the agent supports: this kernel lacks X\n\
            ok\n\
            test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
            ZTAI-VM-END audit rc=0 passed=2 failed=0 ignored=0 skipped=1 seconds=1\n\
            ZTAI-VM-RESULT kernel=5.10 passed=2 failed=0 ignored=0 skipped=1 excluded=1 binaries=1 agent=refused seconds=1 refused: this kernel (5.10.0) lacks X (SO_NETNS_COOKIE), which ztai needs; it arrived in Linux 5.14\n\
            ZTAI-VM-DONE uptime=5\n";
        let r = parse(log);
        assert_eq!(r.verdict(), Verdict::Refused);
        assert_eq!((r.passed(), r.skipped(), r.failed()), (1, 1, 0));
        assert!(
            r.refused
                .as_deref()
                .unwrap()
                .contains("arrived in Linux 5.14")
        );
        match &r.preflight {
            Some(Preflight::Failed { state, log, .. }) => {
                assert_eq!(state, "exited");
                assert_eq!(log.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        // A test that fails on a refused kernel fails the kernel.
        let failing = log.replace(
            "ZTAI-VM-END audit rc=0 passed=2 failed=0",
            "ZTAI-VM-END audit rc=101 passed=1 failed=1",
        );
        assert_eq!(parse(&failing).verdict(), Verdict::Failed);
    }
}
