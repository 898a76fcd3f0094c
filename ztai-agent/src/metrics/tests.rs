//! Exposition checked by a real OpenMetrics parser, and the HTTP endpoints
//! over a loopback socket.
use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::*;
use crate::flows::{FlowRecord, Totals};

const PIP_HINT: &str = "install it with: python3 -m pip install prometheus-client";

/// Parses with python's prometheus_client and prints every sample as JSON.
/// The parser is lazy, so iterating everything is what validates.
const PARSER: &str = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "unit": fam.unit,
                    "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// One parsed sample.
#[derive(Debug)]
struct Sample {
    family: String,
    kind: String,
    unit: String,
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn parse_openmetrics(body: &str) -> Vec<Sample> {
    let mut child = match Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot run python3 to validate the OpenMetrics output ({e}); install python3, then {PIP_HINT}"),
    };
    child.stdin.take().expect("stdin is piped").write_all(body.as_bytes()).expect("write to python3");
    let out = child.wait_with_output().expect("wait for python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("python3 lacks the prometheus_client package ({}); {PIP_HINT}", stderr.trim());
    }
    assert!(out.status.success(), "OpenMetrics parser rejected the exposition:\n{stderr}\n--- body ---\n{body}");
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("parser output is JSON");
    parsed
        .as_array()
        .expect("a list of samples")
        .iter()
        .map(|s| {
            let str_of = |k: &str| s[k].as_str().unwrap_or_default().to_string();
            let mut labels: Vec<(String, String)> = s["labels"]
                .as_object()
                .expect("labels object")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            labels.sort();
            Sample {
                family: str_of("family"),
                kind: str_of("type"),
                unit: str_of("unit"),
                name: str_of("name"),
                labels,
                value: s["value"].as_f64().expect("numeric value"),
            }
        })
        .collect()
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    let mut want: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    want.sort();
    samples.iter().find(|s| s.name == name && s.labels == want)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    find(samples, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in {samples:#?}")).value
}

fn flow(src: &str, dst: &str, addr: &str, port: u16, port_label: &str, verdict: &str, c: [u64; 4]) -> FlowRecord {
    FlowRecord {
        src_segment: src.into(),
        dst_segment: dst.into(),
        dst_addr: addr.parse().expect("test address"),
        dst_port: port,
        proto: "tcp".into(),
        verdict: verdict.into(),
        port_label: port_label.into(),
        orig_packets: c[0],
        orig_bytes: c[1],
        reply_packets: c[2],
        reply_bytes: c[3],
    }
}

fn sample_snapshot() -> Snapshot {
    let mut flows = vec![
        flow("web", "db", "10.0.0.1", 5432, "5432", "allow", [10, 1000, 8, 4000]),
        flow("web", "db", "10.0.0.2", 5432, "5432", "allow", [5, 500, 4, 2000]),
    ];
    // A denied scan over many ports: must collapse into one "other" series.
    flows.extend((0..200u16).map(|i| flow("web", "db", "10.0.0.3", 20_000 + i, "other", "deny", [1, 60, 0, 0])));
    Snapshot {
        policy_name: "test".into(),
        generation: 3,
        segments: vec!["web".into(), "db".into()],
        labeled_cgroups: 7,
        totals: Totals { allowed: 15, denied: 200, audited: 2, events_dropped: 1, flow_table_evictions: 4, ..Default::default() },
        flows,
        ready: true,
    }
}

#[test]
fn exposition_is_valid_openmetrics_with_expected_values() {
    let state = MetricsState::new();
    state.update(&sample_snapshot());
    let body = state.encode().expect("encode");
    assert!(body.ends_with("# EOF\n"), "missing EOF marker:\n{body}");
    let s = parse_openmetrics(&body);

    let labels = |port, direction, verdict| {
        [("src_segment", "web"), ("dst_segment", "db"), ("proto", "tcp"), ("port", port), ("direction", direction), ("verdict", verdict)]
    };
    assert_eq!(value(&s, "ztai_flow_packets_total", &labels("5432", "orig", "allow")), 15.0);
    assert_eq!(value(&s, "ztai_flow_packets_total", &labels("5432", "reply", "allow")), 12.0);
    assert_eq!(value(&s, "ztai_flow_bytes_total", &labels("5432", "orig", "allow")), 1500.0);
    assert_eq!(value(&s, "ztai_flow_bytes_total", &labels("5432", "reply", "allow")), 6000.0);
    assert_eq!(value(&s, "ztai_flow_packets_total", &labels("other", "orig", "deny")), 200.0);
    assert_eq!(value(&s, "ztai_flow_bytes_total", &labels("other", "reply", "deny")), 0.0);

    // Cardinality: 2 series × 2 directions, whatever the number of flows.
    for name in ["ztai_flow_packets_total", "ztai_flow_bytes_total"] {
        let samples: Vec<_> = s.iter().filter(|x| x.name == name).collect();
        assert_eq!(samples.len(), 4, "{name}: {samples:#?}");
        assert!(samples.iter().all(|x| x.kind == "counter"));
    }
    let bytes = find(&s, "ztai_flow_bytes_total", &labels("5432", "orig", "allow")).expect("bytes sample");
    assert_eq!((bytes.family.as_str(), bytes.unit.as_str()), ("ztai_flow_bytes", "bytes"));

    assert_eq!(value(&s, "ztai_policy_verdicts_total", &[("verdict", "allow")]), 15.0);
    assert_eq!(value(&s, "ztai_policy_verdicts_total", &[("verdict", "deny")]), 200.0);
    assert_eq!(value(&s, "ztai_policy_verdicts_total", &[("verdict", "audit")]), 2.0);
    assert_eq!(value(&s, "ztai_events_dropped_total", &[]), 1.0);
    assert_eq!(value(&s, "ztai_flow_table_evictions_total", &[]), 4.0);
    assert_eq!(value(&s, "ztai_labeled_cgroups", &[]), 7.0);
    assert_eq!(value(&s, "ztai_policy_generation", &[]), 3.0);
    let build = find(&s, "ztai_build_info", &[("version", env!("CARGO_PKG_VERSION"))]).expect("build info");
    assert_eq!((build.kind.as_str(), build.value), ("info", 1.0));
}

#[test]
fn counters_stay_monotonic_in_the_exposition_across_eviction() {
    let state = MetricsState::new();
    state.update(&sample_snapshot());
    // Every flow evicted, one re-created with small counters.
    state.update(&Snapshot {
        segments: vec!["web".into(), "db".into()],
        flows: vec![flow("web", "db", "10.0.0.1", 5432, "5432", "allow", [1, 100, 0, 0])],
        ..sample_snapshot()
    });
    let s = parse_openmetrics(&state.encode().expect("encode"));
    let orig = [("src_segment", "web"), ("dst_segment", "db"), ("proto", "tcp"), ("port", "5432"), ("direction", "orig"), ("verdict", "allow")];
    assert_eq!(value(&s, "ztai_flow_packets_total", &orig), 16.0);
    assert_eq!(value(&s, "ztai_flow_bytes_total", &orig), 1600.0);
}

#[test]
fn empty_state_is_valid_openmetrics() {
    let s = parse_openmetrics(&MetricsState::new().encode().expect("encode"));
    assert!(s.iter().all(|x| !x.name.starts_with("ztai_flow_packets")));
    assert_eq!(value(&s, "ztai_policy_generation", &[]), 0.0);
}

#[test]
fn missing_capabilities_are_one_gauge_series_each() {
    let state = MetricsState::new();
    let s = parse_openmetrics(&state.encode().expect("encode"));
    assert!(find(&s, "ztai_capability_missing", &[("capability", "CAP_SYS_PTRACE")]).is_none(), "nothing before the check ran");
    state.set_capabilities(vec![("CAP_SYS_ADMIN", false), ("CAP_SYS_PTRACE", true), ("CAP_DAC_READ_SEARCH", true)]);
    let s = parse_openmetrics(&state.encode().expect("encode"));
    let missing = |cap| find(&s, "ztai_capability_missing", &[("capability", cap)]).expect("a series per capability");
    assert_eq!((missing("CAP_SYS_ADMIN").kind.as_str(), missing("CAP_SYS_ADMIN").value), ("gauge", 0.0));
    assert_eq!(missing("CAP_SYS_PTRACE").value, 1.0);
    assert_eq!(missing("CAP_DAC_READ_SEARCH").value, 1.0);
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

async fn request(addr: SocketAddr, raw: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .expect("response within 5s")
        .expect("read response");
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("head/body separator");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let headers = lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let reply = Reply { status, headers, body: body.to_string() };
    assert_eq!(reply.header("Content-Length"), Some(reply.body.len().to_string().as_str()), "{status_line}");
    assert_eq!(reply.header("Connection"), Some("close"));
    reply
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")).await
}

#[tokio::test]
async fn http_endpoints() {
    let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let state = MetricsState::new();
    state.update(&sample_snapshot());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
    }));

    // A client that connects and never sends must not hold up the others.
    let _slow = TcpStream::connect(addr).await.expect("connect slow client");
    let r = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz")).await.expect("not blocked by a slow client");
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));

    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some(CONTENT_TYPE));
    let s = parse_openmetrics(&r.body);
    assert_eq!(value(&s, "ztai_policy_verdicts_total", &[("verdict", "deny")]), 200.0);
    // Query strings are ignored, as scrapers may add them.
    assert_eq!(get(addr, "/metrics?x=1").await.status, 200);

    let r = get(addr, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
    state.set_ready(true);
    let r = get(addr, "/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready"));
    state.set_ready(false);
    assert_eq!(get(addr, "/readyz").await.status, 503);

    assert_eq!(get(addr, "/").await.status, 404);
    assert_eq!(get(addr, "/metricsx").await.status, 404);
    let r = request(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").await;
    assert_eq!((r.status, r.header("Allow")), (405, Some("GET")));
    assert_eq!(request(addr, "HEAD /healthz HTTP/1.1\r\n\r\n").await.status, 405);
    assert_eq!(request(addr, "garbage\r\n\r\n").await.status, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(request(addr, &huge).await.status, 431);

    drop(stop);
    tokio::time::timeout(Duration::from_secs(2), server).await.expect("server stops on shutdown").expect("server task");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed after shutdown");
}

#[tokio::test]
async fn bind_error_names_the_address() {
    let taken = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let addr = taken.local_addr().expect("local addr");
    let err = bind(addr).await.expect_err("address in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
