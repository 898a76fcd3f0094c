//! The cheapest way to ask "how is a process in this cgroup judged right now?": fork the test
//! process (no exec), have the child join the cgroup, create a TCP socket and connect once,
//! and exit with the errno. Used where the spawn cost of a probe would count against a latency
//! being measured (a new cgroup labeled within milliseconds).

use crate::Cgroup;
use std::ffi::CString;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Exit status of the child when it cannot join the cgroup.
pub const JOIN_FAILED: i32 = 250;
/// Exit status of the child when socket() fails.
pub const SOCKET_FAILED: i32 = 251;

/// A prepared connect attempt: everything the child needs is built before fork, so the child
/// only makes async-signal-safe system calls (open, write, close, socket, setsockopt, connect,
/// _exit).
pub struct ForkedConnect {
    procs: CString,
    addr: libc::sockaddr_storage,
    addr_len: libc::socklen_t,
    family: libc::c_int,
}

/// What one attempt found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub pid: u32,
    /// 0 when connect() succeeded, else its errno (or [`JOIN_FAILED`] / [`SOCKET_FAILED`]).
    pub code: i32,
}

impl Attempt {
    pub fn is_eperm(&self) -> bool {
        self.code == libc::EPERM
    }
}

impl ForkedConnect {
    /// Attempts from a new process in `cg` to `addr` (TCP).
    pub fn new(cg: &Cgroup, addr: SocketAddr) -> ForkedConnect {
        ForkedConnect::in_dir(&cg.path(), addr)
    }

    /// Attempts from a new process in the cgroup directory `dir` (which may not exist yet:
    /// nothing is touched before the first attempt) to `addr` (TCP).
    pub fn in_dir(dir: &Path, addr: SocketAddr) -> ForkedConnect {
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .expect("cgroup path has no NUL");
        // SAFETY: sockaddr_storage is plain data; all-zero is valid.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (family, len) = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { (&mut ss as *mut _ as *mut libc::sockaddr_in).write(sin) };
                (libc::AF_INET, std::mem::size_of::<libc::sockaddr_in>())
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: as above, for sockaddr_in6.
                unsafe { (&mut ss as *mut _ as *mut libc::sockaddr_in6).write(sin6) };
                (libc::AF_INET6, std::mem::size_of::<libc::sockaddr_in6>())
            }
        };
        ForkedConnect {
            procs,
            addr: ss,
            addr_len: len as libc::socklen_t,
            family,
        }
    }

    /// Forks, lets the child connect once, and reaps it. The child's connect() is bounded by a
    /// 2 s SO_SNDTIMEO, so the blocking wait is bounded too (and adds no polling delay to the
    /// latency being measured).
    #[track_caller]
    pub fn attempt(&self) -> Attempt {
        // SAFETY: the child runs only async-signal-safe system calls on data prepared above,
        // allocates nothing and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            unsafe { self.child() }
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid on our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            if r == pid {
                break;
            }
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::Interrupted,
                "waitpid({pid}): {e}"
            );
        }
        assert!(
            libc::WIFEXITED(status),
            "forked connect attempt (pid {pid}) did not exit normally: status {status:#x}"
        );
        Attempt {
            pid: pid as u32,
            code: libc::WEXITSTATUS(status),
        }
    }

    /// The child: join the cgroup, connect, exit with the errno.
    unsafe fn child(&self) -> ! {
        unsafe {
            let fd = libc::open(self.procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(JOIN_FAILED);
            }
            libc::close(fd);
            let s = libc::socket(self.family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 {
                libc::_exit(SOCKET_FAILED);
            }
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            libc::setsockopt(
                s,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            let rc = libc::connect(
                s,
                (&self.addr as *const libc::sockaddr_storage).cast(),
                self.addr_len,
            );
            let code = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(code)
        }
    }
}
