//! The local control socket: the agent serves its live [`Snapshot`] to root
//! on a Unix socket, and `ztai-agent flows` reads it from there.
//!
//! Protocol: the client sends one line, `snapshot\n`; the server answers one
//! JSON line (the snapshot, or `{"error":"…"}`) and closes. The client side
//! never loads or attaches anything: it only talks to the socket, so it is
//! safe to run next to a running agent.
//!
//! [`Snapshot`]: crate::flows::Snapshot
use std::path::PathBuf;

mod client;
mod server;
mod view;

pub use client::{FlowsOptions, fetch_snapshot, parse_interval, run_flows};
pub use server::{ControlSocket, serve};
pub use view::{render_json, render_table};

/// Where the agent listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ztai/agent.sock";

/// The one request the server understands.
const CMD_SNAPSHOT: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("is ztai-agent running? (no socket at {})", path.display())]
    NotRunning { path: PathBuf },
    #[error("is ztai-agent running? ({} exists but nothing answers on it: the agent that created it has exited)", path.display())]
    NotListening { path: PathBuf },
    #[error("permission denied on {}: the flow table is root-only; run this as root (e.g. `sudo ztai-agent flows`)", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("ztai-agent did not answer on {} within {secs}s; is it stuck? check its logs", path.display())]
    Timeout { path: PathBuf, secs: u64 },
    #[error("ztai-agent refused the request: {message}")]
    Refused { message: String },
    #[error("unexpected answer from ztai-agent on {}: {detail}; are the agent and this command the same version?", path.display())]
    Protocol { path: PathBuf, detail: String },
    #[error("another ztai-agent is already serving {}; stop it first (two agents would fight over the same kernel programs)", path.display())]
    AlreadyRunning { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it (remove it if nothing needs it)", path.display())]
    NotASocket { path: PathBuf },
    #[error("--interval must be more than zero")]
    InvalidInterval,
    #[error("{what}")]
    Io { what: String, #[source] source: std::io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlError {
    let what = what.into();
    move |source| ControlError::Io { what, source }
}

#[cfg(test)]
mod test_util {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        path::{Path, PathBuf},
        sync::atomic::{AtomicU32, Ordering},
    };

    use crate::flows::{FlowRecord, Snapshot, Totals};

    /// A fresh directory under the system temp dir, removed on drop (no
    /// tempfile crate in this workspace).
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ztai-control-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).expect("create temp dir");
            Self(dir)
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

    pub fn flow(src: &str, dst: &str, addr: IpAddr, port: u16, verdict: &str, bytes: (u64, u64)) -> FlowRecord {
        FlowRecord {
            src_segment: src.into(),
            dst_segment: dst.into(),
            dst_addr: addr,
            dst_port: port,
            proto: "tcp".into(),
            verdict: verdict.into(),
            port_label: port.to_string(),
            orig_packets: bytes.0 / 100 + 1,
            orig_bytes: bytes.0,
            reply_packets: bytes.1 / 100,
            reply_bytes: bytes.1,
        }
    }

    pub fn sample() -> Snapshot {
        Snapshot {
            policy_name: "lab".into(),
            generation: 3,
            segments: vec!["inference".into(), "training".into(), "vectordb".into()],
            labeled_cgroups: 7,
            totals: Totals {
                allowed: 120,
                denied: 4,
                audited: 2,
                events_dropped: 1,
                flow_table_evictions: 5,
                socket_table_full: 0,
                udp_replies: 9,
                ..Default::default()
            },
            flows: vec![
                flow("inference", "vectordb", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 6333, "allow", (2_048, 1_572_864)),
                flow("training", "world", IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 443, "deny", (0, 0)),
                flow("inference", "host", IpAddr::V6(Ipv6Addr::LOCALHOST), 8000, "audit", (300, 200)),
                flow("training", "vectordb", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 6333, "allow", (5_368_709_120, 1_024)),
            ],
            ready: true,
        }
    }
}
