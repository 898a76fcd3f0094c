//! Line-by-line capture of a child's stdout/stderr on a background thread.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    lines: Vec<String>,
    closed: bool,
}

/// All lines read so far from one pipe; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct LineLog {
    inner: Arc<(Mutex<State>, Condvar)>,
}

/// Why [`LineLog::wait_for`] gave up.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// The pipe reached EOF (the writer exited) without a match.
    Closed,
    /// The deadline passed without a match.
    TimedOut,
}

impl LineLog {
    /// Starts a thread that reads `reader` line by line until EOF.
    pub fn capture<R: Read + Send + 'static>(reader: R) -> LineLog {
        let log = LineLog::default();
        let writer = log.clone();
        std::thread::Builder::new()
            .name("ztai-line-reader".into())
            .spawn(move || {
                let mut r = BufReader::new(reader);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&buf)
                                .trim_end_matches(['\n', '\r'])
                                .to_string();
                            writer.push(line);
                        }
                    }
                }
                let (m, cv) = &*writer.inner;
                m.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                cv.notify_all();
            })
            .expect("spawn line reader thread");
        log
    }

    fn push(&self, line: String) {
        let (m, cv) = &*self.inner;
        m.lock().unwrap_or_else(|e| e.into_inner()).lines.push(line);
        cv.notify_all();
    }

    /// A copy of every line read so far.
    pub fn snapshot(&self) -> Vec<String> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lines
            .clone()
    }

    /// Whether the pipe reached EOF.
    pub fn is_closed(&self) -> bool {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed
    }

    /// Waits until `f` (called with all lines so far, after each new line) returns `Some`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&[String]) -> Option<T>,
    ) -> Result<T, WaitEnd> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(v) = f(&st.lines) {
                return Ok(v);
            }
            if st.closed {
                return Err(WaitEnd::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitEnd::TimedOut);
            }
            st = cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for EOF.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        self.wait_for(timeout, |_| None::<()>) == Err(WaitEnd::Closed)
    }

    /// The last `n` lines joined with newlines (for failure messages).
    pub fn tail(&self, n: usize) -> String {
        let lines = self.snapshot();
        let start = lines.len().saturating_sub(n);
        lines[start..].join("\n")
    }
}
