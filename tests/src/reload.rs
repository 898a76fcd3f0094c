//! Changing a running agent's policy: rewriting the file (rename-style or in place), SIGHUP,
//! and waiting for what the agent logs about it.
//!
//! Assumed agent contract:
//! * the agent reloads on SIGHUP (always) and when its policy file changes (close after write,
//!   or a file renamed over it; a change to identical content is ignored);
//! * an applied policy logs `{"msg":"policy applied","generation":N,"trigger":"SIGHUP"|"file change"}`;
//! * a rejected one logs, per error,
//!   `{"msg":"policy reload rejected; the previous policy stays in force","diagnostic":"<file>:<line>:<col>: error: ..."}`.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::session::mono_ns;
use crate::{Agent, try_wait_until};

/// `msg` of the log line of an applied policy.
pub const APPLIED_MSG: &str = "policy applied";

/// `msg` of the log lines of a rejected reload (one per error).
pub const REJECTED_MSG: &str = "policy reload rejected; the previous policy stays in force";

/// `trigger` of a reload caused by SIGHUP.
pub const TRIGGER_SIGHUP: &str = "SIGHUP";

/// `trigger` of a reload caused by a change of the policy file.
pub const TRIGGER_FILE: &str = "file change";

impl Agent {
    fn staging_path(&self) -> PathBuf {
        let p = self.policy_path();
        let name = p
            .file_name()
            .expect("policy path has a file name")
            .to_string_lossy();
        p.with_file_name(format!(".{name}.new"))
    }

    /// Writes `yaml` to a new file beside the policy file and renames it over the policy file,
    /// as editors and config management do. Returns CLOCK_MONOTONIC ns right after the rename.
    #[track_caller]
    pub fn replace_policy(&self, yaml: &str) -> u64 {
        let tmp = self.staging_path();
        let mut f =
            File::create(&tmp).unwrap_or_else(|e| panic!("cannot create {}: {e}", tmp.display()));
        f.write_all(yaml.as_bytes())
            .and_then(|()| f.sync_all())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        drop(f);
        std::fs::rename(&tmp, self.policy_path()).unwrap_or_else(|e| {
            panic!(
                "cannot rename {} over {}: {e}",
                tmp.display(),
                self.policy_path().display()
            )
        });
        mono_ns()
    }

    /// Rewrites the policy file in place (open with O_TRUNC, write, close). Returns
    /// CLOCK_MONOTONIC ns right after the close.
    #[track_caller]
    pub fn overwrite_policy(&self, yaml: &str) -> u64 {
        drop(self.overwrite_policy_held_open(yaml));
        mono_ns()
    }

    /// Rewrites the policy file in place and returns it still open: until it is closed, the
    /// change is complete on disk but no "closed after write" event has happened, so only a
    /// SIGHUP makes the agent read it.
    #[track_caller]
    pub fn overwrite_policy_held_open(&self, yaml: &str) -> File {
        let path = self.policy_path();
        let mut f = File::options()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open {} for writing: {e}", path.display()));
        f.write_all(yaml.as_bytes())
            .and_then(|()| f.flush())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        f
    }

    /// Sends SIGHUP to the agent (a process this test started). Returns CLOCK_MONOTONIC ns
    /// right after the signal was sent.
    #[track_caller]
    pub fn sighup(&self) -> u64 {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        assert!(pid > 1, "bad agent pid {pid}");
        // SAFETY: kill(2) on the positive pid of the agent this test started.
        let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
        assert_eq!(
            rc,
            0,
            "kill(agent {pid}, SIGHUP): {}",
            std::io::Error::last_os_error()
        );
        mono_ns()
    }

    /// Every stderr log line whose `msg` is `msg`.
    pub fn logs_with_msg(&self, msg: &str) -> Vec<Value> {
        self.logs()
            .into_iter()
            .filter(|v| v["msg"] == msg)
            .collect()
    }

    /// Polls the agent's stderr until a JSON log line satisfies `pred`; panics (with the agent's
    /// diagnostics) after `timeout`.
    #[track_caller]
    pub fn wait_log(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        try_wait_until(timeout, || self.logs().into_iter().find(|v| pred(v))).unwrap_or_else(|| {
            panic!(
                "no agent log line {what} within {timeout:?}\ncurrent policy file:\n{}\n{}",
                self.current_policy_text(),
                self.diagnostics()
            )
        })
    }

    /// Waits for `"msg":"policy applied"` with this `generation` and returns the line.
    #[track_caller]
    pub fn wait_policy_applied(&self, generation: u64, timeout: Duration) -> Value {
        self.wait_log(
            &format!("{{\"msg\":\"{APPLIED_MSG}\",\"generation\":{generation}}}"),
            timeout,
            |v| v["msg"] == APPLIED_MSG && v["generation"] == generation,
        )
    }

    /// `(generation, trigger)` of every "policy applied" line so far, in order.
    pub fn applied_policies(&self) -> Vec<(u64, String)> {
        self.logs_with_msg(APPLIED_MSG)
            .iter()
            .map(|v| {
                (
                    v["generation"].as_u64().unwrap_or(0),
                    v["trigger"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// What the policy file holds now (for failure messages; the diagnostics show the policy
    /// the agent was started with).
    pub fn current_policy_text(&self) -> String {
        std::fs::read_to_string(self.policy_path())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.policy_path().display()))
    }
}
