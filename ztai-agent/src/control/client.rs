//! `ztai-agent flows`: reads the agent's snapshot over the control socket
//! and shows it. Never loads or attaches anything.
use std::{
    io::{self, BufRead as _, BufReader, IsTerminal as _, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::signal::unix::{SignalKind, signal};

use super::{
    CMD_SNAPSHOT, ControlError, DEFAULT_SOCKET, io_err,
    view::{fit, render_json, render_table, table_lines},
};
use crate::flows::Snapshot;

/// How long the agent may take to answer before we say it looks stuck.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Far above a full flow table (65 536 flows of ~300 bytes), but bounded.
const MAX_REPLY: u64 = 256 << 20;
/// Faster refreshes only load the agent; nobody reads a table that fast.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowsOptions {
    /// The agent's control socket.
    pub socket: PathBuf,
    /// Print one JSON document and exit.
    pub json: bool,
    /// Print the table once and exit.
    pub once: bool,
    /// Refresh period of the live view.
    pub interval: Duration,
}

impl Default for FlowsOptions {
    fn default() -> Self {
        Self { socket: PathBuf::from(DEFAULT_SOCKET), json: false, once: false, interval: Duration::from_secs(2) }
    }
}

/// Parses `--interval` seconds ("2", "0.5"); usable as a clap value parser.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a usable number of seconds"))?;
    if d < MIN_INTERVAL {
        return Err(format!("must be at least {} seconds", MIN_INTERVAL.as_secs_f64()));
    }
    Ok(d)
}

fn connect_error(path: &Path, e: io::Error) -> ControlError {
    let path = path.to_path_buf();
    match e.kind() {
        io::ErrorKind::NotFound => ControlError::NotRunning { path },
        io::ErrorKind::ConnectionRefused => ControlError::NotListening { path },
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path },
        _ => ControlError::Io { what: format!("cannot connect to ztai-agent on {}", path.display()), source: e },
    }
}

fn transfer_error(path: &Path, e: io::Error) -> ControlError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ControlError::Timeout { path: path.into(), secs: TIMEOUT.as_secs() },
        _ => ControlError::Io { what: format!("lost the connection to ztai-agent on {}", path.display()), source: e },
    }
}

/// A snapshot, or the server's `{"error":…}` line as [`ControlError::Refused`].
fn parse_reply(path: &Path, reply: &[u8]) -> Result<Snapshot, ControlError> {
    let protocol = |detail: String| ControlError::Protocol { path: path.into(), detail };
    if reply.is_empty() {
        return Err(protocol("the connection closed without an answer".into()));
    }
    if !reply.ends_with(b"\n") {
        return Err(protocol(if reply.len() as u64 >= MAX_REPLY {
            format!("the answer is larger than {} MiB", MAX_REPLY >> 20)
        } else {
            "the answer was cut short".into()
        }));
    }
    let value: serde_json::Value = serde_json::from_slice(reply).map_err(|e| protocol(format!("not JSON ({e})")))?;
    if let Some(message) = value.get("error").and_then(serde_json::Value::as_str) {
        return Err(ControlError::Refused { message: message.into() });
    }
    serde_json::from_value(value).map_err(|e| protocol(format!("not a snapshot ({e})")))
}

/// Asks the agent listening on `path` for its current snapshot.
pub fn fetch_snapshot(path: &Path) -> Result<Snapshot, ControlError> {
    let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(io_err("cannot set a timeout on the control socket"))?;
    (&stream).write_all(format!("{CMD_SNAPSHOT}\n").as_bytes()).map_err(|e| transfer_error(path, e))?;
    let mut reply = Vec::new();
    BufReader::new((&stream).take(MAX_REPLY))
        .read_until(b'\n', &mut reply)
        .map_err(|e| transfer_error(path, e))?;
    parse_reply(path, &reply)
}

/// `… | head` closing the pipe early is not an error: the reader has what
/// it wanted.
fn write_stdout(s: &str) -> Result<bool, ControlError> {
    let mut out = io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(io_err("cannot write to stdout")(e)),
    }
}

/// (columns, rows) of the terminal on stdout; None when it is not one.
fn terminal_size() -> Option<(usize, usize)> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the valid pointer.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((usize::from(ws.ws_col), usize::from(ws.ws_row)))
}

/// The alternate screen, like top: the shell's scrollback is back intact
/// when the view exits, however it exits (Ctrl-C, error, broken pipe).
struct Screen;

impl Screen {
    fn enter() -> Result<Self, ControlError> {
        // Enter the alternate screen, hide the cursor.
        write_stdout("\x1b[?1049h\x1b[?25l")?;
        Ok(Self)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = write_stdout("\x1b[?25h\x1b[?1049l");
    }
}

/// One screenful: a status line, then the table (or why it is missing).
fn frame(interval: Duration, latest: &Result<Snapshot, ControlError>, size: Option<(usize, usize)>, now: &str) -> Vec<String> {
    let (width, rows) = size.unwrap_or((usize::MAX, usize::MAX));
    let mut lines = vec![fit(&format!("ztai-agent flows  every {interval:?}  {now}  (Ctrl-C to quit)"), width)];
    match latest {
        Ok(snapshot) => lines.extend(table_lines(snapshot, width, rows.saturating_sub(1))),
        // Keep going: the agent may be restarting.
        Err(e) => lines.push(fit(&format!("cannot refresh: {e} (retrying)"), width)),
    }
    lines
}

/// On a terminal: redraw in place without a trailing newline, so a full
/// screen never scrolls. Otherwise (batch, like `top -b`): frames one after
/// another, separated by a blank line.
fn draw(lines: &[String], tty: bool) -> Result<bool, ControlError> {
    let mut out = String::new();
    if tty {
        out.push_str("\x1b[H");
        for (i, line) in lines.iter().enumerate() {
            if i > 0 {
                out.push_str("\r\n");
            }
            out.push_str(line);
            out.push_str("\x1b[K");
        }
        out.push_str("\x1b[J");
    } else {
        for line in lines {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
    }
    write_stdout(&out)
}

async fn live(opts: &FlowsOptions, first: Snapshot) -> Result<(), ControlError> {
    // Ctrl-C must end the loop, not the process, so the screen is restored.
    let mut sigint = signal(SignalKind::interrupt()).map_err(io_err("cannot install a Ctrl-C handler"))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(io_err("cannot install a SIGTERM handler"))?;
    let tty = io::stdout().is_terminal();
    let _screen = if tty { Some(Screen::enter()?) } else { None };
    let mut latest = Ok(first);
    loop {
        let now = chrono::Local::now().format("%H:%M:%S").to_string();
        if !draw(&frame(opts.interval, &latest, terminal_size(), &now), tty)? {
            return Ok(());
        }
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            () = tokio::time::sleep(opts.interval) => {}
        }
        // Blocking fetch off the loop so Ctrl-C works while the agent is slow.
        let socket = opts.socket.clone();
        let fetch = tokio::task::spawn_blocking(move || fetch_snapshot(&socket));
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            joined = fetch => {
                latest = joined.unwrap_or_else(|e| Err(ControlError::Io { what: "the refresh failed".into(), source: io::Error::other(e) }));
            }
        }
    }
}

/// `ztai-agent flows`: `--json` prints one JSON document, `--once` one
/// table; otherwise a live view refreshed every `interval` until Ctrl-C.
pub fn run_flows(opts: FlowsOptions) -> Result<(), ControlError> {
    if opts.json {
        let snapshot = fetch_snapshot(&opts.socket)?;
        write_stdout(&(render_json(&snapshot) + "\n"))?;
        return Ok(());
    }
    if opts.once {
        let snapshot = fetch_snapshot(&opts.socket)?;
        let width = terminal_size().map_or(usize::MAX, |(cols, _)| cols);
        write_stdout(&render_table(&snapshot, width))?;
        return Ok(());
    }
    if opts.interval.is_zero() {
        return Err(ControlError::InvalidInterval);
    }
    // Fail with the helpful message before taking over the screen.
    let first = fetch_snapshot(&opts.socket)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("cannot start the async runtime"))?;
    let result = rt.block_on(live(&opts, first));
    // A fetch stuck on a hung agent must not delay the exit.
    rt.shutdown_background();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::test_util::{TempDir, sample};

    #[test]
    fn missing_socket_says_what_to_do() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        let err = fetch_snapshot(&path).expect_err("no socket");
        assert!(matches!(err, ControlError::NotRunning { .. }));
        assert_eq!(err.to_string(), format!("is ztai-agent running? (no socket at {})", path.display()));
        // The run options refuse the same way, before any screen handling.
        let opts = FlowsOptions { socket: path, once: true, ..FlowsOptions::default() };
        assert!(matches!(run_flows(opts), Err(ControlError::NotRunning { .. })));
    }

    #[test]
    fn replies_are_parsed() {
        let p = Path::new("/run/ztai/agent.sock");
        let line = format!("{}\n", serde_json::to_string(&sample()).expect("json"));
        assert_eq!(parse_reply(p, line.as_bytes()).expect("snapshot"), sample());
        match parse_reply(p, b"{\"error\":\"permission denied: x\"}\n") {
            Err(ControlError::Refused { message }) => assert_eq!(message, "permission denied: x"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_reply(p, b""), Err(ControlError::Protocol { .. })));
        assert!(matches!(parse_reply(p, b"{\"policy_name\":"), Err(ControlError::Protocol { .. })));
        let err = parse_reply(p, b"{\"something\":1}\n").expect_err("not a snapshot");
        assert!(err.to_string().contains("same version"), "{err}");
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("NaN").is_err());
        assert!(parse_interval("soon").is_err());
        let opts = FlowsOptions { interval: Duration::ZERO, ..FlowsOptions::default() };
        assert!(matches!(run_flows(opts), Err(ControlError::InvalidInterval)));
    }

    #[test]
    fn frames_fit_the_terminal() {
        let lines = frame(Duration::from_secs(2), &Ok(sample()), Some((70, 6)), "12:00:00");
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[0], "ztai-agent flows  every 2s  12:00:00  (Ctrl-C to quit)");
        assert!(lines.iter().all(|l| l.chars().count() <= 70), "{lines:#?}");
        assert!(lines[5].starts_with("… "), "{lines:#?}");

        let err = Err(ControlError::NotListening { path: DEFAULT_SOCKET.into() });
        let lines = frame(Duration::from_secs(1), &err, None, "12:00:01");
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("cannot refresh: is ztai-agent running?"), "{lines:#?}");
        assert!(lines[1].ends_with("(retrying)"));
    }
}
