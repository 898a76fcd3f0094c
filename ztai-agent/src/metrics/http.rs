//! A deliberately tiny HTTP/1.1 server: scrapers and probes send one small
//! GET and read one response, so each connection answers once and closes.
//! Bounded everywhere (head size, time, connection count) because it listens
//! on a node that it is also protecting.
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    task::JoinSet,
    time::timeout,
};

use super::{CONTENT_TYPE, MetricsError, MetricsState};

/// Largest request head accepted; real probes send a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client gets to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed straight away so a flood
/// cannot exhaust the agent's file descriptors.
const MAX_CONNECTIONS: usize = 64;
/// After answering, unread request bytes are drained (bounded) before
/// closing: closing with unread input sends a RST that can destroy the
/// response before the client reads it.
const MAX_DRAIN: usize = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

const TEXT: &str = "text/plain; charset=utf-8";

/// Binds the metrics listener; the error names the address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` completes;
/// connections still open then are aborted.
pub async fn serve(listener: TcpListener, state: MetricsState, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connections so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        debug!(peer = peer.to_string(); "metrics: too many connections, closing");
                        continue;
                    };
                    let state = state.clone();
                    tasks.spawn(async move {
                        if let Err(e) = handle(stream, &state).await {
                            debug!(peer = peer.to_string(), error = e.to_string(); "metrics connection failed");
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    warn!(error = e.to_string(); "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.shutdown().await;
}

/// What the request head turned out to be.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Parsed { method: String, path: String },
    Malformed,
    TooLarge,
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: Vec<u8>,
}

impl Response {
    fn text(status: &'static str, body: &str) -> Self {
        Self { status, content_type: TEXT, extra_header: None, body: body.as_bytes().to_vec() }
    }
}

async fn handle(mut stream: TcpStream, state: &MetricsState) -> io::Result<()> {
    let request = match timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(r) => r?,
        Err(_) => {
            let _ = timeout(WRITE_TIMEOUT, write_response(&mut stream, &Response::text("408 Request Timeout", "request timeout"))).await;
            return Ok(());
        }
    };
    let response = route(&request, state);
    timeout(WRITE_TIMEOUT, write_response(&mut stream, &response))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client too slow to take the response"))??;
    let _ = timeout(DRAIN_TIMEOUT, drain(&mut stream)).await;
    Ok(())
}

fn route(request: &Request, state: &MetricsState) -> Response {
    let (method, path) = match request {
        Request::Parsed { method, path } => (method.as_str(), path.as_str()),
        Request::Malformed => return Response::text("400 Bad Request", "bad request"),
        Request::TooLarge => return Response::text("431 Request Header Fields Too Large", "request head too large"),
    };
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Response::text("404 Not Found", "not found");
    }
    if method != "GET" {
        return Response { extra_header: Some("Allow: GET"), ..Response::text("405 Method Not Allowed", "method not allowed") };
    }
    match path {
        "/metrics" => match state.encode() {
            Ok(body) => Response { status: "200 OK", content_type: CONTENT_TYPE, extra_header: None, body: body.into_bytes() },
            Err(e) => {
                warn!(error = e.to_string(); "metrics: encoding failed");
                Response::text("500 Internal Server Error", "cannot encode metrics")
            }
        },
        // Answering at all is the liveness signal.
        "/healthz" => Response::text("200 OK", "ok"),
        _ if state.is_ready() => Response::text("200 OK", "ready"),
        _ => Response::text("503 Service Unavailable", "not ready"),
    }
}

/// Reads up to the blank line ending the head, at most `MAX_HEAD` bytes.
async fn read_head(stream: &mut TcpStream) -> io::Result<Request> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            // Closed before the head ended: answer what we have if it has a
            // request line, it costs nothing.
            return Ok(parse_head(&head));
        }
        // Rescan a few bytes back in case the terminator straddles reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_head_end(&head[from..]) {
            return Ok(parse_head(&head[..from + end]));
        }
        if head.len() > MAX_HEAD {
            return Ok(Request::TooLarge);
        }
    }
}

/// Offset of the end of the head (`\r\n\r\n`, or bare `\n\n`).
fn find_head_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_head(head: &[u8]) -> Request {
    if head.len() > MAX_HEAD {
        return Request::TooLarge;
    }
    let line_end = head.iter().position(|&c| c == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Malformed;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Request::Malformed;
    };
    if method.is_empty() || !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Request::Malformed;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Request::Parsed { method: method.to_string(), path: path.to_string() }
}

async fn write_response(stream: &mut TcpStream, r: &Response) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    if let Some(h) = r.extra_header {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&r.body).await?;
    stream.shutdown().await
}

async fn drain(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < MAX_DRAIN {
        match stream.read(&mut buf).await? {
            0 => break,
            n => total += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        let p = |s: &str| parse_head(s.as_bytes());
        assert_eq!(p("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Request::Parsed { method: "GET".into(), path: "/metrics".into() });
        assert_eq!(p("GET /readyz?verbose=1 HTTP/1.0\n\n"), Request::Parsed { method: "GET".into(), path: "/readyz".into() });
        assert_eq!(p("POST /metrics HTTP/1.1\r\n\r\n"), Request::Parsed { method: "POST".into(), path: "/metrics".into() });
        assert_eq!(p("GET /metrics\r\n\r\n"), Request::Malformed);
        assert_eq!(p("GET http://x/metrics HTTP/1.1\r\n\r\n"), Request::Malformed);
        assert_eq!(p("GET /metrics SPDY/3\r\n\r\n"), Request::Malformed);
        assert_eq!(p(""), Request::Malformed);
        assert_eq!(parse_head(&[b'G', 0xff, b' ', b'/', b' ', b'H']), Request::Malformed);
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
