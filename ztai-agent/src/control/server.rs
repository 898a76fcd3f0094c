//! The agent's side: a root-only Unix socket that answers with the current
//! snapshot.
use std::{
    fs, io,
    os::unix::{
        fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use log::{debug, info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
    task::JoinSet,
};

use super::{CMD_SNAPSHOT, ControlError, io_err};
use crate::flows::Snapshot;

/// The flow table names every workload's peers: only root may read it.
const ROOT_UID: u32 = 0;
/// A client that stalls (or never reads) gives up its slot after this.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds the work a local flood of connections can cause.
const MAX_CLIENTS: usize = 16;
/// Requests are one short word; anything longer is not a request.
const MAX_REQUEST: u64 = 256;

/// A bound, not yet serving, control socket. Binding is separate from
/// serving so the agent can claim the socket before it touches the kernel:
/// a second agent then fails before attaching anything.
pub struct ControlSocket {
    // Dropped before the listener: while the listener lives, the socket
    // file's inode cannot be freed and reused, so the guard's identity
    // check cannot be fooled.
    guard: SocketGuard,
    listener: StdUnixListener,
    allowed_uid: u32,
}

/// Removes the socket file when the server goes away, but only if it is
/// still the one this server created: a file another agent bound after us
/// is not ours to delete.
struct SocketGuard {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            warn!(path = self.path.display().to_string(), error = e.to_string(); "cannot remove the control socket");
        }
    }
}

/// Clears the way for binding `path`: a socket nobody answers on is left
/// over from an agent that died and is removed; a live one, or anything
/// that is not a socket, is an error.
fn clear_stale(path: &Path) -> Result<(), ControlError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(format!("cannot inspect {}", path.display()))(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ControlError::NotASocket { path: path.into() });
    }
    match StdUnixStream::connect(path) {
        // The live agent sees a client that sends nothing and closes: it
        // answers nothing and logs nothing.
        Ok(_) => Err(ControlError::AlreadyRunning { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match fs::remove_file(path) {
            Ok(()) => {
                info!(path = path.display().to_string(); "removed stale control socket");
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("cannot remove stale control socket {}", path.display()))(e)),
        },
        Err(e) => Err(io_err(format!("cannot check whether another agent is serving {}", path.display()))(e)),
    }
}

impl ControlSocket {
    /// Creates the parent directory (mode 0700) if needed, replaces a stale
    /// socket, binds `path` and makes it 0600. Does not need a runtime.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            // An existing directory keeps its mode: it may be shared (/run).
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err(format!("cannot create {}", parent.display())))?;
        }
        clear_stale(path)?;
        let listener = StdUnixListener::bind(path).map_err(|e| match e.kind() {
            // Another agent bound it between our check and our bind.
            io::ErrorKind::AddrInUse => ControlError::AlreadyRunning { path: path.into() },
            _ => ControlError::Io { what: format!("cannot bind control socket {}", path.display()), source: e },
        })?;
        let meta = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(io_err(format!("cannot inspect {}", path.display()))(e));
            }
        };
        let guard = SocketGuard { path: path.into(), dev: meta.dev(), ino: meta.ino() };
        // Until this chmod the umask decides; the peer check below is what
        // actually keeps non-root clients out, the mode is a second fence.
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("cannot chmod 0600 {}", path.display())))?;
        listener.set_nonblocking(true).map_err(io_err("cannot make the control socket non-blocking"))?;
        Ok(Self { guard, listener, allowed_uid: ROOT_UID })
    }

    pub fn path(&self) -> &Path {
        &self.guard.path
    }

    /// Test hook: serve a uid other than root (tests run as one user).
    #[cfg(test)]
    fn allow_uid(mut self, uid: u32) -> Self {
        self.allowed_uid = uid;
        self
    }

    /// Answers clients until `shutdown` resolves, then removes the socket.
    /// Each client gets the value `snapshots` holds when it asks. Must run
    /// inside a tokio runtime.
    pub async fn serve(self, snapshots: watch::Receiver<Snapshot>, shutdown: impl Future<Output = ()>) -> Result<(), ControlError> {
        let Self { guard, listener, allowed_uid } = self;
        let listener = UnixListener::from_std(listener).map_err(io_err("cannot register the control socket"))?;
        info!(path = guard.path.display().to_string(); "control socket listening");
        let mut clients = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        while clients.try_join_next().is_some() {}
                        if clients.len() >= MAX_CLIENTS {
                            // Best effort: tell it why instead of a bare close.
                            let _ = stream.try_write(&error_line("busy: too many control clients, try again"));
                            continue;
                        }
                        clients.spawn(handle_client(stream, snapshots.clone(), allowed_uid));
                    }
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        warn!(error = e.to_string(); "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        clients.shutdown().await;
        drop(guard);
        drop(listener);
        info!("control socket closed");
        Ok(())
    }
}

/// Binds `path` and serves it until `shutdown` resolves; see
/// [`ControlSocket::bind`] and [`ControlSocket::serve`].
pub async fn serve(path: &Path, snapshots: watch::Receiver<Snapshot>, shutdown: impl Future<Output = ()>) -> Result<(), ControlError> {
    ControlSocket::bind(path)?.serve(snapshots, shutdown).await
}

/// Only `allowed_uid` (root outside tests) is served. The uid is the
/// client's effective uid at connect time, as the kernel recorded it, so it
/// cannot be forged; root in a user namespace shows up as its mapped uid.
fn check_peer(peer_uid: u32, allowed_uid: u32) -> Result<(), String> {
    if peer_uid == allowed_uid {
        Ok(())
    } else {
        Err(format!("permission denied: only uid {allowed_uid} may read the flow table, this client is uid {peer_uid}"))
    }
}

fn error_line(message: &str) -> Vec<u8> {
    let mut out = serde_json::json!({ "error": message }).to_string().into_bytes();
    out.push(b'\n');
    out
}

fn answer(request: &str, snapshots: &watch::Receiver<Snapshot>) -> Vec<u8> {
    match request {
        CMD_SNAPSHOT => {
            // Serialize under the borrow (no await here) instead of cloning
            // a possibly large flow table.
            let encoded = serde_json::to_vec(&*snapshots.borrow());
            match encoded {
                Ok(mut out) => {
                    out.push(b'\n');
                    out
                }
                Err(e) => error_line(&format!("cannot encode snapshot: {e}")),
            }
        }
        other => error_line(&format!("unknown command {other:?}; the only command is {CMD_SNAPSHOT:?}")),
    }
}

async fn handle_client(stream: UnixStream, snapshots: watch::Receiver<Snapshot>, allowed_uid: u32) {
    match tokio::time::timeout(CLIENT_TIMEOUT, converse(stream, &snapshots, allowed_uid)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = e.to_string(); "control client failed"),
        Err(_) => debug!("control client timed out"),
    }
}

async fn converse(mut stream: UnixStream, snapshots: &watch::Receiver<Snapshot>, allowed_uid: u32) -> io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (reader, mut writer) = stream.split();
    // Read the request before answering even a refusal: closing with unread
    // data makes the client's read fail with ECONNRESET instead of showing
    // our message.
    let mut request = Vec::new();
    BufReader::new(reader).take(MAX_REQUEST).read_until(b'\n', &mut request).await?;
    if request.is_empty() {
        return Ok(()); // a liveness probe (see `clear_stale`)
    }
    let reply = match check_peer(uid, allowed_uid) {
        Ok(()) => answer(String::from_utf8_lossy(&request).trim(), snapshots),
        Err(message) => {
            warn!(uid = uid; "control socket: refused a non-root client");
            error_line(&message)
        }
    };
    writer.write_all(&reply).await?;
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader as StdBufReader, Write as _};

    use tokio::sync::oneshot;

    use super::*;
    use crate::control::{
        fetch_snapshot,
        test_util::{TempDir, sample},
    };

    fn my_uid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    struct Running {
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), ControlError>>,
    }

    impl Running {
        async fn stop(self) {
            let _ = self.stop.send(());
            self.task.await.expect("server task").expect("server result");
        }
    }

    fn start(socket: ControlSocket, rx: watch::Receiver<Snapshot>) -> Running {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(socket.serve(rx, async {
            let _ = stopped.await;
        }));
        Running { stop, task }
    }

    async fn fetch(path: &Path) -> Result<Snapshot, ControlError> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || fetch_snapshot(&path)).await.expect("fetch task")
    }

    #[tokio::test]
    async fn serves_the_current_snapshot_and_cleans_up() {
        let dir = TempDir::new();
        let path = dir.path().join("run/ztai/agent.sock");
        let (tx, rx) = watch::channel(sample());
        let server = start(ControlSocket::bind(&path).expect("bind").allow_uid(my_uid()), rx);

        assert_eq!(fetch(&path).await.expect("fetch"), sample());
        // Each request sees the latest value.
        let mut next = sample();
        next.generation = 4;
        next.flows.truncate(1);
        tx.send_replace(next.clone());
        assert_eq!(fetch(&path).await.expect("fetch"), next);

        server.stop().await;
        assert!(!path.exists(), "socket file left behind");
        assert!(matches!(fetch(&path).await, Err(ControlError::NotRunning { .. })));
    }

    #[tokio::test]
    async fn socket_is_0600_in_a_0700_directory() {
        let dir = TempDir::new();
        let path = dir.path().join("ztai/agent.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        let mode = |p: &Path| fs::symlink_metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().expect("parent")), 0o700);
        drop(socket);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn second_server_fails_while_the_first_runs() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        let (_tx, rx) = watch::channel(sample());
        let first = start(ControlSocket::bind(&path).expect("bind").allow_uid(my_uid()), rx.clone());

        let err = ControlSocket::bind(&path).err().expect("second bind must fail");
        assert!(matches!(err, ControlError::AlreadyRunning { .. }), "{err}");
        assert!(err.to_string().contains("another ztai-agent is already serving"), "{err}");
        // The first one still owns and serves its socket.
        assert_eq!(fetch(&path).await.expect("fetch"), sample());
        first.stop().await;
    }

    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        // A dead agent: the file stays, nothing listens.
        drop(StdUnixListener::bind(&path).expect("bind stale"));
        assert!(path.exists());
        assert!(matches!(fetch(&path).await, Err(ControlError::NotListening { .. })));

        let (_tx, rx) = watch::channel(sample());
        let server = start(ControlSocket::bind(&path).expect("bind over stale").allow_uid(my_uid()), rx);
        assert_eq!(fetch(&path).await.expect("fetch"), sample());
        server.stop().await;
    }

    #[tokio::test]
    async fn refuses_to_replace_a_non_socket() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        fs::write(&path, "keep me").expect("write");
        assert!(matches!(ControlSocket::bind(&path), Err(ControlError::NotASocket { .. })));
        assert_eq!(fs::read_to_string(&path).expect("read"), "keep me");
    }

    #[test]
    fn only_the_allowed_uid_passes() {
        assert!(check_peer(0, ROOT_UID).is_ok());
        let err = check_peer(1000, ROOT_UID).expect_err("non-root must be refused");
        assert!(err.contains("uid 1000"), "{err}");
        assert!(check_peer(65534, ROOT_UID).is_err());
    }

    #[tokio::test]
    async fn other_uids_are_refused_end_to_end() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        let (_tx, rx) = watch::channel(sample());
        // Serve a uid nobody here has, so this test's client is "non-root".
        let server = start(ControlSocket::bind(&path).expect("bind").allow_uid(my_uid().wrapping_add(4242)), rx);
        match fetch(&path).await {
            Err(ControlError::Refused { message }) => assert!(message.contains("permission denied"), "{message}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn unknown_command_gets_a_json_error() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        let (_tx, rx) = watch::channel(sample());
        let server = start(ControlSocket::bind(&path).expect("bind").allow_uid(my_uid()), rx);
        let p = path.clone();
        let line = tokio::task::spawn_blocking(move || {
            let mut s = StdUnixStream::connect(&p).expect("connect");
            s.write_all(b"flush-everything\n").expect("write");
            let mut line = String::new();
            StdBufReader::new(s).read_line(&mut line).expect("read");
            line
        })
        .await
        .expect("client task");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        let msg = v["error"].as_str().expect("error field");
        assert!(msg.contains("unknown command \"flush-everything\""), "{msg}");
        server.stop().await;
    }

    #[tokio::test]
    async fn guard_leaves_a_replaced_socket_alone() {
        let dir = TempDir::new();
        let path = dir.path().join("agent.sock");
        let socket = ControlSocket::bind(&path).expect("bind");
        // Someone else took the path over (e.g. an operator removed ours and
        // started another agent).
        fs::remove_file(&path).expect("remove");
        let other = StdUnixListener::bind(&path).expect("rebind");
        drop(socket);
        assert!(path.exists(), "removed a socket that was not ours");
        drop(other);
    }
}
