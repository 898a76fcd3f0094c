//! The few libc calls the bench needs (xtask has no libc dependency): signals,
//! socket options, a private network namespace, bringing `lo` up.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

mod c {
    unsafe extern "C" {
        pub fn kill(pid: i32, sig: i32) -> i32;
        pub fn signal(sig: i32, handler: usize) -> usize;
        pub fn setsockopt(
            fd: i32,
            level: i32,
            name: i32,
            value: *const core::ffi::c_void,
            len: u32,
        ) -> i32;
        pub fn unshare(flags: i32) -> i32;
        pub fn socket(domain: i32, ty: i32, protocol: i32) -> i32;
        pub fn ioctl(fd: i32, request: u64, ...) -> i32;
        pub fn close(fd: i32) -> i32;
        pub fn sysconf(name: i32) -> i64;
        pub fn connect(fd: i32, addr: *const u8, len: u32) -> i32;
        pub fn fcntl(fd: i32, cmd: i32, ...) -> i32;
        pub fn wait4(pid: i32, status: *mut i32, options: i32, rusage: *mut i64) -> i32;
        pub fn sched_setaffinity(pid: i32, size: usize, mask: *const u64) -> i32;
    }
}

pub const SIGINT: i32 = 2;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGHUP: i32 = 1;
pub const EPERM: i32 = 1;

const SOL_SOCKET: i32 = 1;
const SO_LINGER: i32 = 13;
const CLONE_NEWNET: i32 = 0x4000_0000;
const AF_INET: i32 = 2;
const SOCK_STREAM: i32 = 1;
const SOCK_DGRAM: i32 = 2;
const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const IFF_UP: i16 = 1;
const SC_CLK_TCK: i32 = 2;

pub use crate::host::is_root;

/// Sends `sig` to `pid` (a process this bench started). Refuses pid <= 1.
pub fn signal_pid(pid: u32, sig: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    if pid <= 1 {
        return Err(io::Error::other(format!("refusing to signal pid {pid}")));
    }
    // SAFETY: kill(2) on a positive pid.
    if unsafe { c::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: i32) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT/SIGTERM set a flag the bench checks between steps, so it unwinds
/// through its cleanup guards instead of dying with cgroups and tables left.
pub fn install_interrupt_flag() {
    for sig in [SIGINT, SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { c::signal(sig, on_signal as *const () as usize) };
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `SO_LINGER {on, 0}`: close() sends RST and leaves no TIME_WAIT socket, so
/// a long connect loop never runs out of ephemeral ports.
pub fn set_linger_zero(sock: &impl AsRawFd) {
    let linger: [i32; 2] = [1, 0];
    // SAFETY: a valid fd and an 8-byte struct linger.
    unsafe {
        c::setsockopt(
            sock.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            linger.as_ptr().cast(),
            8,
        )
    };
}

/// Moves the calling thread (the main thread, before any other exists) into a
/// new network namespace with `lo` up. Everything spawned afterwards lives
/// there: the agent, the workloads, nftables tables. The namespace disappears
/// with the last of them, so nothing is left on the host's network.
pub fn enter_private_netns() -> io::Result<()> {
    // SAFETY: unshare(2) with a flag; affects only this thread's namespaces.
    if unsafe { c::unshare(CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2).
    let fd = unsafe { c::socket(AF_INET, SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // struct ifreq: 16-byte name, then a union whose first member is short flags.
    let mut ifr = [0u8; 40];
    ifr[..2].copy_from_slice(b"lo");
    // SAFETY: ifr is a zeroed, large-enough struct ifreq.
    let rc = unsafe { c::ioctl(fd, SIOCGIFFLAGS, ifr.as_mut_ptr()) };
    let result = if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        let flags = i16::from_ne_bytes([ifr[16], ifr[17]]) | IFF_UP;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: as above.
        if unsafe { c::ioctl(fd, SIOCSIFFLAGS, ifr.as_mut_ptr()) } != 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: fd is ours.
    unsafe { c::close(fd) };
    result
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { c::sysconf(SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Denied TCP connects as fast as the kernel answers them: one socket, and
/// `connect()` again after each EPERM (a connect a cgroup program refuses
/// leaves the socket unconnected). Returns (attempts, denied).
/// At most `rate` attempts per second (0: unpaced).
pub fn denied_connect_loop(
    port: u16,
    dur: std::time::Duration,
    rate: u64,
) -> io::Result<(u64, u64)> {
    let start = std::time::Instant::now();
    // struct sockaddr_in: family, port (big-endian), 127.0.0.1, zero padding.
    let mut sa = [0u8; 16];
    sa[..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
    sa[2..4].copy_from_slice(&port.to_be_bytes());
    sa[4..8].copy_from_slice(&[127, 0, 0, 1]);
    let new_socket = || {
        // SAFETY: plain socket(2).
        let fd = unsafe { c::socket(AF_INET, SOCK_STREAM, 0) };
        if fd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(fd)
        }
    };
    let mut fd = new_socket()?;
    let (mut attempts, mut denied) = (0u64, 0u64);
    // Bounded by time and by a count no run reaches.
    while attempts < 1_000_000_000 {
        for _ in 0..256 {
            attempts += 1;
            // SAFETY: fd is ours; sa is a valid sockaddr_in of 16 bytes.
            if unsafe { c::connect(fd, sa.as_ptr(), 16) } == 0 {
                // Not denied (nothing enforced): start over with a fresh socket.
                // SAFETY: fd is ours.
                unsafe { c::close(fd) };
                fd = new_socket()?;
            } else if io::Error::last_os_error().raw_os_error() == Some(EPERM) {
                denied += 1;
            } else {
                // SAFETY: fd is ours.
                unsafe { c::close(fd) };
                fd = new_socket()?;
            }
        }
        let elapsed = start.elapsed();
        if elapsed >= dur {
            break;
        }
        // Paced: leave the CPU to the agent rather than racing ahead of the rate.
        if rate > 0 && attempts as f64 > rate as f64 * elapsed.as_secs_f64() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    // SAFETY: fd is ours.
    unsafe { c::close(fd) };
    Ok((attempts, denied))
}

const F_SETPIPE_SZ: i32 = 1031;

/// Best effort: a larger pipe buffer.
pub fn set_pipe_size(pipe: &impl AsRawFd, bytes: i32) {
    // SAFETY: fcntl on a valid fd with an int argument.
    unsafe { c::fcntl(pipe.as_raw_fd(), F_SETPIPE_SZ, bytes) };
}

/// Runs `cmd` to completion; returns (success, wall time, peak RSS in KiB)
/// from wait4(2)'s rusage of that one child.
pub fn run_measured(
    cmd: &mut std::process::Command,
) -> io::Result<(bool, std::time::Duration, u64)> {
    let start = std::time::Instant::now();
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id() as i32;
    // struct rusage (x86_64/aarch64): two struct timeval, then long ru_maxrss (KiB); 144 bytes.
    let mut usage = [0i64; 18];
    let mut status = 0i32;
    loop {
        // SAFETY: waits for our own child; status and usage are large enough.
        let rc = unsafe { c::wait4(pid, &mut status, 0, usage.as_mut_ptr()) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    // The child is reaped here; `child` is dropped without waiting on it again.
    drop(child);
    let exited_ok = status & 0x7f == 0 && (status >> 8) & 0xff == 0;
    Ok((exited_ok, start.elapsed(), usage[4].max(0) as u64))
}

/// Pins the calling process (and what it execs or forks later) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut mask = [0u64; 16];
    if cpu >= mask.len() * 64 {
        return Err(io::Error::other(format!("cpu {cpu} out of range")));
    }
    mask[cpu / 64] |= 1 << (cpu % 64);
    // SAFETY: a valid cpu_set_t-sized mask for this process (pid 0).
    if unsafe { c::sched_setaffinity(0, std::mem::size_of_val(&mask), mask.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
