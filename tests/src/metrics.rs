//! Reading the agent's HTTP endpoint (`/metrics`, `/healthz`, `/readyz`) and its OpenMetrics text.
//!
//! Two parsers:
//! * [`parse_with_prometheus_client`] hands the text to the reference implementation, python3
//!   `prometheus_client.openmetrics.parser.text_string_to_metric_families`, which rejects anything
//!   that is not valid OpenMetrics (the metrics scenario uses it);
//! * [`parse_samples`] is a small Rust reader of sample lines for polling counters quickly.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::Agent;

/// Deadline for one HTTP exchange with the agent.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET <path>` on `addr` (HTTP/1.1, `Connection: close`), reading until the server closes.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(HTTP_TIMEOUT)))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send request to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read response from {addr}: {e}"))?;
    parse_http_response(&raw).map_err(|e| format!("GET {path} on {addr}: {e}"))
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {text:?}"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status = parts
        .next()
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let mut body = body.to_string();
    if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        if body.len() < len {
            return Err(format!(
                "body cut short: Content-Length {len}, got {} bytes",
                body.len()
            ));
        }
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// One sample: metric name as exposed (`ztai_flow_packets_total`), labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether every `(name, value)` pair in `want` is one of this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).map(String::as_str) == Some(*v))
    }
}

/// The value of the one sample named `name` whose labels include `labels`; `None` when there is
/// none; panics when several match (the label set is then not specific enough).
#[track_caller]
pub fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && s.has_labels(labels))
        .collect();
    assert!(
        found.len() <= 1,
        "several samples {name}{labels:?} match: {found:#?}"
    );
    found.first().map(|s| s.value)
}

/// Reads the sample lines of an OpenMetrics/Prometheus text exposition (comments skipped).
pub fn parse_samples(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => return Err(err("no value")),
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(mut r) = rest.strip_prefix('{') {
            loop {
                r = r.trim_start_matches(',');
                if let Some(after) = r.strip_prefix('}') {
                    break after;
                }
                let (k, after) = r.split_once("=\"").ok_or_else(|| err("bad label"))?;
                let mut v = String::new();
                let mut chars = after.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => v.push('\n'),
                            Some((_, c)) => v.push(c),
                            None => return Err(err("bad escape")),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => v.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                };
                labels.insert(k.to_string(), v);
                r = &after[end + 1..];
            }
        } else {
            rest
        };
        let value = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| err("bad value"))?,
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The python3 program: OpenMetrics text on stdin, a JSON list of families on stdout.
const PY_PARSER: &str = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError as e:
    print("IMPORT-ERROR " + str(e))
    sys.exit(3)
text = sys.stdin.read()
out = []
try:
    for fam in text_string_to_metric_families(text):
        out.append({
            "name": fam.name,
            "type": fam.type,
            "unit": fam.unit,
            "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in fam.samples],
        })
except Exception as e:
    print("PARSE-ERROR " + type(e).__name__ + ": " + str(e))
    sys.exit(4)
print(json.dumps(out))
"#;

/// One metric family as the reference parser returned it.
#[derive(Debug, Clone)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub unit: String,
    pub samples: Vec<Sample>,
}

/// Parses `text` with python3 `prometheus_client`'s OpenMetrics parser (strict: a malformed
/// exposition fails). Panics with an install hint when the module is missing.
#[track_caller]
pub fn parse_with_prometheus_client(text: &str) -> Vec<Family> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PY_PARSER)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 (needed to parse /metrics with the reference OpenMetrics \
                 parser; install python3 and then `python3 -m pip install prometheus-client`): {e}"
            )
        });
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(text.as_bytes())
            .expect("write the exposition to python3");
    }
    let out = child.wait_with_output().expect("wait for python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "python3 has no prometheus_client ({}) — install it with \
             `python3 -m pip install prometheus-client`",
            stdout.trim()
        ),
        Some(4) => panic!(
            "the agent's /metrics is not valid OpenMetrics according to prometheus_client: {}\n\
             --- exposition ---\n{text}",
            stdout.trim()
        ),
        _ => panic!(
            "python3 OpenMetrics parser failed ({}): {stdout}{stderr}",
            out.status
        ),
    }
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("python3 printed no JSON ({e}): {stdout}"));
    v.as_array()
        .expect("a JSON list of families")
        .iter()
        .map(|f| Family {
            name: f["name"].as_str().unwrap_or_default().to_string(),
            kind: f["type"].as_str().unwrap_or_default().to_string(),
            unit: f["unit"].as_str().unwrap_or_default().to_string(),
            samples: f["samples"]
                .as_array()
                .expect("samples list")
                .iter()
                .map(|s| Sample {
                    name: s["name"].as_str().unwrap_or_default().to_string(),
                    labels: s["labels"]
                        .as_object()
                        .expect("labels object")
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect(),
                    value: s["value"].as_f64().unwrap_or(f64::NAN),
                })
                .collect(),
        })
        .collect()
}

/// The four counters of one flow series (`ztai_flow_packets_total` / `ztai_flow_bytes_total`
/// with `direction="orig"` and `"reply"`); a missing series reads as 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowCounts {
    pub orig_packets: u64,
    pub orig_bytes: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
}

impl FlowCounts {
    /// Reads the series whose labels include `series` (every label but `direction`).
    #[track_caller]
    pub fn from_samples(samples: &[Sample], series: &[(&str, &str)]) -> FlowCounts {
        let get = |name: &str, dir: &str| {
            let mut labels = series.to_vec();
            labels.push(("direction", dir));
            sample_value(samples, name, &labels).unwrap_or(0.0) as u64
        };
        FlowCounts {
            orig_packets: get("ztai_flow_packets_total", "orig"),
            orig_bytes: get("ztai_flow_bytes_total", "orig"),
            reply_packets: get("ztai_flow_packets_total", "reply"),
            reply_bytes: get("ztai_flow_bytes_total", "reply"),
        }
    }

    /// Whether every counter is at least `other`'s.
    pub fn covers(&self, other: &FlowCounts) -> bool {
        self.orig_packets >= other.orig_packets
            && self.orig_bytes >= other.orig_bytes
            && self.reply_packets >= other.reply_packets
            && self.reply_bytes >= other.reply_bytes
    }
}

impl Agent {
    /// Polls `/metrics` until the flow series `series` (all labels but `direction`) satisfies
    /// `done`, and returns its counters then. Panics after `timeout` with the last counters and
    /// exposition.
    #[track_caller]
    pub fn wait_flow_counts(
        &self,
        series: &[(&str, &str)],
        timeout: Duration,
        done: impl Fn(&FlowCounts) -> bool,
    ) -> FlowCounts {
        let mut last = (FlowCounts::default(), String::new());
        let r = crate::try_wait_until(timeout, || {
            let resp = self.http_get("/metrics");
            let samples = parse_samples(&resp.body).ok()?;
            let c = FlowCounts::from_samples(&samples, series);
            last = (c, resp.body);
            done(&c).then_some(c)
        });
        r.unwrap_or_else(|| {
            panic!(
                "flow series {series:?} did not reach the expected counters within {timeout:?}; \
                 last: {:?}\n--- last /metrics ---\n{}\n{}",
                last.0,
                last.1,
                self.diagnostics()
            )
        })
    }

    /// `GET <path>` on the agent's metrics address; panics (with diagnostics) when it fails.
    #[track_caller]
    pub fn http_get(&self, path: &str) -> HttpResponse {
        let addr = self.metrics_addr();
        http_get(addr, path).unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// Scrapes `/metrics` and reads its samples with [`parse_samples`].
    #[track_caller]
    pub fn scrape(&self) -> Vec<Sample> {
        let r = self.http_get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {r:?}\n{}", self.diagnostics());
        parse_samples(&r.body).unwrap_or_else(|e| panic!("/metrics: {e}\n{}", r.body))
    }

    /// Polls `/metrics` until `name{labels}` is at least `want` (or the deadline passes), then
    /// returns the samples of that scrape. Panics showing the last value and the exposition.
    #[track_caller]
    pub fn wait_metric_at_least(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
        timeout: Duration,
    ) -> Vec<Sample> {
        let mut last = (None, String::new());
        let r = crate::try_wait_until(timeout, || {
            let resp = self.http_get("/metrics");
            let samples = parse_samples(&resp.body).ok()?;
            let v = sample_value(&samples, name, labels);
            last = (v, resp.body);
            (v.is_some_and(|v| v >= want)).then_some(samples)
        });
        r.unwrap_or_else(|| {
            panic!(
                "{name}{labels:?} did not reach {want} within {timeout:?} (last value: {:?})\n\
                 --- last /metrics ---\n{}\n{}",
                last.0,
                last.1,
                self.diagnostics()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_with_labels_and_escapes() {
        let text = "# TYPE x counter\n\
                    x_total{a=\"1\",b=\"q\\\"uo\\\\te\"} 3\n\
                    y 4.5\n\
                    z{} 0\n\
                    # EOF\n";
        let s = parse_samples(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].labels["b"], "q\"uo\\te");
        assert_eq!(sample_value(&s, "x_total", &[("a", "1")]), Some(3.0));
        assert_eq!(sample_value(&s, "y", &[]), Some(4.5));
        assert_eq!(sample_value(&s, "z", &[]), Some(0.0));
        assert_eq!(sample_value(&s, "x_total", &[("a", "2")]), None);
    }

    #[test]
    fn parses_a_response_with_content_length() {
        let r = parse_http_response(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(r.body, "ok");
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nok").is_err());
    }
}
