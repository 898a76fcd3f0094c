//! ztai-probe: a tiny real TCP/UDP client/server used as the workload in ztai's integration tests.
//!
//! ```text
//! ztai-probe tcp-listen  ADDR:PORT                  # prints "listening <addr>", echoes one line per connection
//! ztai-probe tcp-connect ADDR:PORT [--bind A:P] [--send-bytes K] [--timeout-ms MS] [--reset]
//!                                                   # connect + one echo round trip (or a bulk upload)
//! ztai-probe udp-echo    ADDR:PORT                  # prints "listening <addr>", sendto()s each datagram back
//! ztai-probe udp-send    ADDR:PORT [--connect] [--expect-reply] [--bind A:P] [--count N] [--timeout-ms MS]
//! ztai-probe tcp-loop    ADDR:PORT [ADDR:PORT...] [--timeout-ms MS] [--interval-ms MS] [--rounds N]
//!                                                   # fresh TCP connection per attempt, round-robin; one line each
//! ztai-probe tcp-echo    ADDR:PORT                  # prints "listening <addr>", echoes every line until the peer closes
//! ztai-probe tcp-session ADDR:PORT [--rounds N] [--interval-ms MS] [--timeout-ms MS] [--bind A:P]
//! ztai-probe udp-session ADDR:PORT [--rounds N] [--interval-ms MS] [--timeout-ms MS] [--bind A:P]
//!                                                   # one connection, a request/response round every MS
//! ztai-probe raw-recv    IPV4 --proto N [--proto M...] # AF_INET SOCK_RAW receivers, one per protocol
//! ztai-probe raw-send    IPV4 --proto N [--bind IPV4[:0]] # one raw IPv4 packet of protocol N
//! ```
//!
//! Sessions (`tcp-session` against `tcp-echo`, `udp-session` against `udp-echo` over a connected
//! UDP socket) keep one connection and do a round trip every `--interval-ms` (default 50; the
//! wait between rounds is a poll() on the socket, so a reset or close is seen at once) with a
//! per-round deadline of `--timeout-ms`, for `--rounds` rounds (default 10; 0 = until one fails).
//! They print `connected <local> <peer>`, then per round `round <i> ok <sent_ns> <rtt_us>` or, for
//! the first failed one, `round <i> fail <sent_ns> <detected_ns> <ERRNO_NAME>` followed by the
//! usual `err ...` line; `*_ns` are CLOCK_MONOTONIC nanoseconds (comparable across processes).
//!
//! `--timeout-ms` is the client's I/O deadline (connect, reads, UDP replies; default 5000).
//! `--send-bytes K` uploads K bytes after a `ztai-probe bulk K` header line; the server reads
//! exactly K bytes and answers `received K`. `--count N` sends N datagrams from one socket (each
//! waiting for its echo with `--expect-reply`).
//!
//! Clients print one final status line: `ok`, or `err <ERRNO_NAME> <message>`; with `--bind`
//! they first print `bound <local addr>`. Servers print `listening <local addr>` (port 0 is
//! replaced by the real port), then `accepted <peer>` / `echo <peer> ok|err ...` per peer.
//! IPv6 sockets are dual-stack (IPV6_V6ONLY=0), so `[::]:p` servers accept v4-mapped clients
//! and `[::ffff:127.0.0.1]:p` is reached over an AF_INET6 socket.
//!
//! `--reset` (tcp-connect) closes with SO_LINGER {1, 0}: the connection ends with a RST and leaves
//! no TIME_WAIT, so the same `--bind` address and port can open the same 4-tuple again at once
//! (the socket also sets SO_REUSEADDR before binding).
//!
//! Raw IPv4 (`raw-recv`, `raw-send`): the receiver opens one `socket(AF_INET, SOCK_RAW, N)` per
//! `--proto` (bound to IPV4 unless it is 0.0.0.0), prints `listening <IPV4> proto <N,M,...>`, and
//! prints `recv <proto> <src ip> <payload>` per packet (the payload after the IP header, after the
//! 8-byte ICMP header for protocol 1, as text). Whenever it wakes it drains its sockets in the
//! order the protocols were given, so a packet of the first protocol queued before one of the
//! second is always printed first. The sender sends one packet with the payload
//! `ztai-probe raw <pid>` (for protocol 1 an ICMP echo request carrying it), prints
//! `sent <bytes> bytes` and `ok`; with `--bind` first `bound <ip>:0`.
//!
//! Exit codes: 0 ok, 2 usage, 3 EPERM, 4 ECONNREFUSED, 5 other error, 6 no UDP reply in time,
//! 7 TCP timeout (the handshake or a read did not complete within the deadline).

use std::io::{self, BufRead, BufReader, Write};
use std::mem::{size_of, size_of_val, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::exit;
use std::time::Duration;

const EXIT_OK: i32 = 0;
const EXIT_USAGE: i32 = 2;
const EXIT_EPERM: i32 = 3;
const EXIT_REFUSED: i32 = 4;
const EXIT_OTHER: i32 = 5;
const EXIT_NO_REPLY: i32 = 6;
const EXIT_TIMEOUT: i32 = 7;

/// Default client I/O deadline (connect, echo read, UDP reply); `--timeout-ms` overrides it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// First line of a bulk upload: `ztai-probe bulk <K>`.
const BULK_PREFIX: &str = "ztai-probe bulk ";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `tcp-loop` takes one or more addresses and parses its own options.
    if args.first().is_some_and(|c| c == "tcp-loop") {
        exit(tcp_loop(&args[1..]));
    }
    // Raw modes take an IPv4 address without a port.
    match args.first().map(String::as_str) {
        Some("raw-recv") => exit(raw_recv(&args[1..])),
        Some("raw-send") => exit(raw_send(&args[1..])),
        _ => {}
    }
    let Some((cmd, rest)) = args.split_first() else {
        usage("missing command")
    };
    let Some((addr, flags)) = rest.split_first() else {
        usage("missing ADDR:PORT")
    };
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| usage(&format!("bad ADDR:PORT {addr:?}: {e}")));
    let opts = Opts::parse(flags);
    let code = match cmd.as_str() {
        "tcp-listen" => tcp_listen(addr),
        "tcp-connect" => tcp_connect(addr, &opts),
        "udp-echo" => udp_echo(addr),
        "udp-send" => udp_send(addr, &opts),
        "tcp-echo" => tcp_echo(addr),
        "tcp-session" => tcp_session(addr, &opts),
        "udp-session" => udp_session(addr, &opts),
        other => usage(&format!("unknown command {other:?}")),
    };
    exit(code);
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "ztai-probe: {msg}\nusage: ztai-probe tcp-listen|tcp-connect|udp-echo|udp-send|tcp-echo|tcp-session|udp-session \
         ADDR:PORT [--connect] [--expect-reply] [--bind ADDR:PORT] [--timeout-ms MS] [--count N] \
         [--send-bytes K] [--rounds N] [--interval-ms MS] [--reset]\n       ztai-probe tcp-loop ADDR:PORT... \
         [--timeout-ms MS] [--interval-ms MS] [--rounds N]\n       ztai-probe raw-recv IPV4 --proto N [--proto M...]\n       \
         ztai-probe raw-send IPV4 --proto N [--bind IPV4]"
    );
    exit(EXIT_USAGE)
}

struct Opts {
    connect: bool,
    expect_reply: bool,
    bind: Option<SocketAddr>,
    timeout: Duration,
    count: u32,
    send_bytes: Option<u64>,
    /// Sessions: number of round trips (0 = until one fails).
    rounds: u64,
    /// Sessions: time from the start of one round to the start of the next.
    interval: Duration,
    /// tcp-connect: close with SO_LINGER {1, 0} (RST, no TIME_WAIT).
    reset: bool,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts {
            connect: false,
            expect_reply: false,
            bind: None,
            timeout: IO_TIMEOUT,
            count: 1,
            send_bytes: None,
            rounds: 10,
            interval: Duration::from_millis(50),
            reset: false,
        }
    }
}

fn number<T: std::str::FromStr>(it: &mut std::slice::Iter<'_, String>, flag: &str) -> T
where
    T::Err: std::fmt::Display,
{
    let v = it
        .next()
        .unwrap_or_else(|| usage(&format!("{flag} needs a number")));
    v.parse()
        .unwrap_or_else(|e| usage(&format!("bad {flag} {v:?}: {e}")))
}

impl Opts {
    fn parse(flags: &[String]) -> Opts {
        let mut o = Opts::default();
        let mut it = flags.iter();
        while let Some(f) = it.next() {
            match f.as_str() {
                "--connect" => o.connect = true,
                "--reset" => o.reset = true,
                "--expect-reply" => o.expect_reply = true,
                "--bind" => {
                    let a = it.next().unwrap_or_else(|| usage("--bind needs ADDR:PORT"));
                    o.bind = Some(
                        a.parse()
                            .unwrap_or_else(|e| usage(&format!("bad --bind {a:?}: {e}"))),
                    );
                }
                "--timeout-ms" => {
                    let ms: u64 = number(&mut it, "--timeout-ms");
                    if ms == 0 {
                        usage("--timeout-ms must be more than 0");
                    }
                    o.timeout = Duration::from_millis(ms);
                }
                "--count" => {
                    o.count = number(&mut it, "--count");
                    if o.count == 0 {
                        usage("--count must be more than 0");
                    }
                }
                "--send-bytes" => o.send_bytes = Some(number(&mut it, "--send-bytes")),
                "--rounds" => o.rounds = number(&mut it, "--rounds"),
                "--interval-ms" => {
                    o.interval = Duration::from_millis(number(&mut it, "--interval-ms"))
                }
                other => usage(&format!("unknown option {other:?}")),
            }
        }
        o
    }
}

/// Prints one stdout line and flushes it (the tests read stdout line by line).
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EAGAIN => "EAGAIN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENOENT => "ENOENT",
        libc::EBADF => "EBADF",
        libc::ENOTCONN => "ENOTCONN",
        libc::EMSGSIZE => "EMSGSIZE",
        libc::ENOBUFS => "ENOBUFS",
        _ => "EOTHER",
    }
}

/// Prints `err <NAME> <message>` and returns the exit code for `e`.
fn fail(context: &str, e: &io::Error) -> i32 {
    let (name, code) = match e.raw_os_error() {
        Some(libc::EPERM) => ("EPERM", EXIT_EPERM),
        Some(libc::ECONNREFUSED) => ("ECONNREFUSED", EXIT_REFUSED),
        // A blocking connect() that hits SO_SNDTIMEO returns EINPROGRESS; a read that hits
        // SO_RCVTIMEO returns EAGAIN.
        Some(libc::EINPROGRESS) | Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => {
            ("ETIMEDOUT", EXIT_TIMEOUT)
        }
        Some(n) => (errno_name(n), EXIT_OTHER),
        None if e.kind() == io::ErrorKind::TimedOut => ("ETIMEDOUT", EXIT_TIMEOUT),
        None => ("EOTHER", EXIT_OTHER),
    };
    say(&format!("err {name} {context}: {e}"));
    code
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { (&mut ss as *mut _ as *mut libc::sockaddr_in).write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&mut ss as *mut _ as *mut libc::sockaddr_in6).write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: family says this is a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family says this is a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: getsockname writes at most `len` bytes into ss.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    cvt(unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) })?;
    from_sockaddr(&ss).ok_or_else(|| io::Error::other("unknown address family"))
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passing a pointer to a live c_int with its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as _,
        )
    })
    .map(drop)
}

fn set_timeout(fd: RawFd, name: libc::c_int, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: passing a pointer to a live timeval with its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            &tv as *const _ as *const libc::c_void,
            size_of::<libc::timeval>() as _,
        )
    })
    .map(drop)
}

/// A socket of `addr`'s family; IPv6 sockets are made dual-stack explicitly.
fn new_socket(addr: &SocketAddr, ty: libc::c_int) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket(2); the fd is immediately owned.
    let fd = cvt(unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) })?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if family == libc::AF_INET6 {
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    Ok(fd)
}

fn bind(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = to_sockaddr(addr);
    // SAFETY: ss/len describe a valid sockaddr.
    cvt(unsafe { libc::bind(fd, &ss as *const _ as *const libc::sockaddr, len) }).map(drop)
}

fn connect(fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
    let (ss, len) = to_sockaddr(addr);
    loop {
        // SAFETY: ss/len describe a valid sockaddr.
        match cvt(unsafe { libc::connect(fd, &ss as *const _ as *const libc::sockaddr, len) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r.map(drop),
        }
    }
}

/// Binds a server socket (SO_REUSEADDR, dual-stack for IPv6) and prints `listening <addr>`.
fn server_socket(addr: SocketAddr, ty: libc::c_int) -> Result<OwnedFd, i32> {
    let fd = new_socket(&addr, ty).map_err(|e| fail("socket", &e))?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)
        .map_err(|e| fail("SO_REUSEADDR", &e))?;
    bind(fd.as_raw_fd(), &addr).map_err(|e| fail(&format!("bind {addr}"), &e))?;
    if ty == libc::SOCK_STREAM {
        // SAFETY: listen(2) on our socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) }).map_err(|e| fail("listen", &e))?;
    }
    let local = local_addr(fd.as_raw_fd()).map_err(|e| fail("getsockname", &e))?;
    say(&format!("listening {local}"));
    Ok(fd)
}

fn tcp_listen(addr: SocketAddr) -> i32 {
    let fd = match server_socket(addr, libc::SOCK_STREAM) {
        Ok(fd) => fd,
        Err(code) => return code,
    };
    let listener = TcpListener::from(fd);
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                say(&format!("accepted {peer}"));
                std::thread::spawn(move || echo_one_line(stream));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("accept: {e}");
            }
        }
    }
}

/// Echoes the first line back; after a `ztai-probe bulk K` line, reads exactly K bytes instead
/// and answers `received K`.
fn echo_one_line(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let bulk = line
        .strip_prefix(BULK_PREFIX)
        .and_then(|n| n.trim_end().parse::<u64>().ok());
    match bulk {
        None => {
            let _ = (&stream).write_all(line.as_bytes());
        }
        Some(want) => {
            let got =
                io::copy(&mut io::Read::take(&mut reader, want), &mut io::sink()).unwrap_or(0);
            let _ = (&stream).write_all(format!("received {got}\n").as_bytes());
        }
    }
}

fn tcp_connect(addr: SocketAddr, opts: &Opts) -> i32 {
    let fd = match new_socket(&addr, libc::SOCK_STREAM) {
        Ok(fd) => fd,
        Err(e) => return fail("socket", &e),
    };
    if opts.reset {
        // Whatever way the socket is closed from here on (success, error, exit), it ends with a
        // RST and leaves no TIME_WAIT; SO_REUSEADDR lets a rebind of the same port skip any
        // other leftover of an earlier connection.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: passing a pointer to a live linger with its size.
        let set = cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                size_of::<libc::linger>() as _,
            )
        })
        .and_then(|_| setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1));
        if let Err(e) = set {
            return fail("setsockopt SO_LINGER/SO_REUSEADDR", &e);
        }
    }
    if let Some(b) = opts.bind {
        if let Err(e) = bind(fd.as_raw_fd(), &b) {
            return fail(&format!("bind {b}"), &e);
        }
        match local_addr(fd.as_raw_fd()) {
            Ok(l) => say(&format!("bound {l}")),
            Err(e) => return fail("getsockname", &e),
        }
    }
    // A blocking connect honours SO_SNDTIMEO; a cgroup connect hook's EPERM is immediate.
    if let Err(e) = set_timeout(fd.as_raw_fd(), libc::SO_SNDTIMEO, opts.timeout)
        .and_then(|()| set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, opts.timeout))
    {
        return fail("setsockopt timeout", &e);
    }
    if let Err(e) = connect(fd.as_raw_fd(), &addr) {
        return fail(&format!("connect {addr}"), &e);
    }
    let stream = TcpStream::from(fd);
    if let Some(k) = opts.send_bytes {
        return tcp_bulk(&stream, k);
    }
    let msg = format!("ztai-probe ping {}\n", std::process::id());
    if let Err(e) = (&stream).write_all(msg.as_bytes()) {
        return fail("send", &e);
    }
    let mut reply = String::new();
    if let Err(e) = BufReader::new(&stream).read_line(&mut reply) {
        return fail("recv echo", &e);
    }
    if reply != msg {
        say(&format!(
            "err EBADMSG echo mismatch: sent {msg:?}, got {reply:?}"
        ));
        return EXIT_OTHER;
    }
    say("ok");
    EXIT_OK
}

/// Uploads `k` bytes after the bulk header and waits for the server's `received k`.
fn tcp_bulk(stream: &TcpStream, k: u64) -> i32 {
    let header = format!("{BULK_PREFIX}{k}\n");
    if let Err(e) = (&*stream).write_all(header.as_bytes()) {
        return fail("send bulk header", &e);
    }
    let chunk = [b'z'; 64 * 1024];
    let mut left = k;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if let Err(e) = (&*stream).write_all(&chunk[..n]) {
            return fail("send bulk", &e);
        }
        left -= n as u64;
    }
    let mut reply = String::new();
    if let Err(e) = BufReader::new(stream).read_line(&mut reply) {
        return fail("recv bulk ack", &e);
    }
    if reply.trim_end() != format!("received {k}") {
        say(&format!(
            "err EBADMSG bulk ack mismatch: sent {k} bytes, got {reply:?}"
        ));
        return EXIT_OTHER;
    }
    say(&format!("sent {} bytes", header.len() as u64 + k));
    say("ok");
    EXIT_OK
}

fn udp_echo(addr: SocketAddr) -> i32 {
    let fd = match server_socket(addr, libc::SOCK_DGRAM) {
        Ok(fd) => fd,
        Err(code) => return code,
    };
    // Ask for each datagram's destination address, so a wildcard-bound server replies from the
    // address the client sent to (like real UDP servers must when a host has several addresses;
    // a connected client drops replies from any other source).
    let pktinfo = if addr.is_ipv4() {
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    } else {
        setsockopt_int(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            1,
        )
    };
    if let Err(e) = pktinfo {
        return fail("setsockopt pktinfo", &e);
    }
    let mut buf = [0u8; 2048];
    loop {
        match recv_with_dst(fd.as_raw_fd(), &mut buf) {
            Ok((n, src, src_len, dst)) => {
                let peer = from_sockaddr(&src)
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "?".into());
                match send_from(fd.as_raw_fd(), &buf[..n], &src, src_len, dst) {
                    Ok(()) => say(&format!("echo {peer} ok")),
                    Err(e) => {
                        let name = e.raw_os_error().map(errno_name).unwrap_or("EOTHER");
                        say(&format!("echo {peer} err {name} {e}"));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => eprintln!("recvmsg: {e}"),
        }
    }
}

/// The local (destination) address a datagram was sent to, from IP_PKTINFO / IPV6_PKTINFO.
#[derive(Clone, Copy)]
enum PktDst {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

/// recvmsg(): payload length, source address, and the destination address (if reported).
fn recv_with_dst(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(
    usize,
    libc::sockaddr_storage,
    libc::socklen_t,
    Option<PktDst>,
)> {
    // SAFETY: msghdr/sockaddr_storage are plain data; all pointers refer to live locals of the
    // right sizes, and cmsgs are only read through the CMSG_* accessors within msg_controllen.
    unsafe {
        let mut src: libc::sockaddr_storage = zeroed();
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = (&mut src as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut dst = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_PKTINFO {
                dst = Some(PktDst::V4(std::ptr::read_unaligned(
                    libc::CMSG_DATA(c).cast(),
                )));
            } else if h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_PKTINFO {
                dst = Some(PktDst::V6(std::ptr::read_unaligned(
                    libc::CMSG_DATA(c).cast(),
                )));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, src, msg.msg_namelen, dst))
    }
}

/// sendmsg() of `data` to `to`, from the local address `from` (when known).
fn send_from(
    fd: RawFd,
    data: &[u8],
    to: &libc::sockaddr_storage,
    to_len: libc::socklen_t,
    from: Option<PktDst>,
) -> io::Result<()> {
    // SAFETY: as in recv_with_dst; the one cmsg written fits in `control` (CMSG_SPACE checked).
    unsafe {
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = to as *const libc::sockaddr_storage as *mut libc::c_void;
        msg.msg_namelen = to_len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let (level, ty, len) = match from {
            Some(PktDst::V4(_)) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            Some(PktDst::V6(_)) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
            None => (0, 0, 0),
        };
        if let Some(pkt) = from {
            let space = libc::CMSG_SPACE(len as u32) as usize;
            assert!(space <= size_of_val(&control));
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = ty;
            (*c).cmsg_len = libc::CMSG_LEN(len as u32) as _;
            match pkt {
                PktDst::V4(p) => {
                    // Reply from the address the datagram was sent to; let routing pick the
                    // interface.
                    let out = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: p.ipi_addr,
                        ipi_addr: p.ipi_addr,
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), out);
                }
                PktDst::V6(p) => std::ptr::write_unaligned(libc::CMSG_DATA(c).cast(), p),
            }
        }
        loop {
            if libc::sendmsg(fd, &msg, 0) >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Datagram `i` of `--count`: send, and with `--expect-reply` wait for its echo.
fn udp_one(sock: &UdpSocket, addr: SocketAddr, opts: &Opts, i: u32) -> i32 {
    let of = if opts.count > 1 {
        format!(" (datagram {i} of {})", opts.count)
    } else {
        String::new()
    };
    let payload = format!("ztai-probe datagram {} {i}", std::process::id());
    let sent = if opts.connect {
        sock.send(payload.as_bytes())
    } else {
        sock.send_to(payload.as_bytes(), addr)
    };
    if let Err(e) = sent {
        let what = if opts.connect { "send" } else { "sendto" };
        return fail(&format!("{what} {addr}{of}"), &e);
    }
    if opts.expect_reply {
        let mut buf = [0u8; 2048];
        let got = if opts.connect {
            sock.recv(&mut buf).map(|n| (n, addr))
        } else {
            sock.recv_from(&mut buf)
        };
        match got {
            Ok((n, _from)) if &buf[..n] == payload.as_bytes() => {}
            Ok((n, from)) => {
                say(&format!(
                    "err EBADMSG reply mismatch from {from}{of}: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ));
                return EXIT_OTHER;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                say(&format!(
                    "err ETIMEDOUT no reply from {addr} within {:?}{of}",
                    opts.timeout
                ));
                return EXIT_NO_REPLY;
            }
            Err(e) => return fail(&format!("recv reply{of}"), &e),
        }
    }
    EXIT_OK
}

fn udp_send(addr: SocketAddr, opts: &Opts) -> i32 {
    let fd = match new_socket(&addr, libc::SOCK_DGRAM) {
        Ok(fd) => fd,
        Err(e) => return fail("socket", &e),
    };
    if let Some(b) = opts.bind {
        if let Err(e) = bind(fd.as_raw_fd(), &b) {
            return fail(&format!("bind {b}"), &e);
        }
        match local_addr(fd.as_raw_fd()) {
            Ok(l) => say(&format!("bound {l}")),
            Err(e) => return fail("getsockname", &e),
        }
    }
    if let Err(e) = set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, opts.timeout) {
        return fail("setsockopt timeout", &e);
    }
    // Without --bind the socket stays unbound: sendto()/connect() autobind it, as real clients do.
    let sock = UdpSocket::from(fd);
    if opts.connect
        && let Err(e) = connect(sock.as_raw_fd(), &addr)
    {
        return fail(&format!("connect {addr}"), &e);
    }
    for i in 1..=opts.count {
        let code = udp_one(&sock, addr, opts, i);
        if code != EXIT_OK {
            return code;
        }
    }
    say("ok");
    EXIT_OK
}

/// CLOCK_MONOTONIC in nanoseconds (the clock the tests read too).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid storage; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The errno name a session prints for a failed round (timeouts as `ETIMEDOUT`, like [`fail`]).
fn session_err_name(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(n) => errno_name(n),
        None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT",
        None if e.kind() == io::ErrorKind::UnexpectedEof => "EOF",
        None => "EOTHER",
    }
}

/// poll(2) on one fd for POLLIN, up to `timeout_ns` (rounded up to whole milliseconds).
fn poll_in(fd: RawFd, timeout_ns: u64) -> io::Result<libc::c_short> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout_ns.div_ceil(1_000_000).min(i32::MAX as u64) as libc::c_int;
    loop {
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Ok(0),
            _ => return Ok(p.revents),
        }
    }
}

/// The pending error of a socket (SO_ERROR), as an io::Error.
fn socket_error(fd: RawFd) -> io::Error {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v/len are valid storage for an int option.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 && v != 0 {
        io::Error::from_raw_os_error(v)
    } else {
        io::Error::other("socket reported an error condition")
    }
}

/// Waits until `until_ns` (the start of the next round) while watching the socket: a TCP peer
/// that closes or resets, or an error queued on the socket, ends the wait with that error. Late
/// UDP replies of earlier rounds are read and discarded.
fn session_pace(fd: RawFd, until_ns: u64, udp: bool) -> io::Result<()> {
    loop {
        let now = mono_ns();
        if now >= until_ns {
            return Ok(());
        }
        let revents = poll_in(fd, until_ns - now)?;
        if revents == 0 {
            continue;
        }
        if revents & libc::POLLERR != 0 {
            return Err(socket_error(fd));
        }
        if udp {
            let mut buf = [0u8; 2048];
            // SAFETY: recv into a local buffer of the given length.
            let n =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
            }
            continue;
        }
        let mut b = [0u8; 1];
        // SAFETY: peek one byte into a local buffer.
        let n = unsafe {
            libc::recv(
                fd,
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection",
                ));
            }
            n if n > 0 => return Err(io::Error::other("unexpected data between rounds")),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
                if revents & libc::POLLHUP != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection hung up",
                    ));
                }
            }
        }
    }
}

/// Runs the rounds of a session on `fd`; `round(i)` does one request/response.
fn session_rounds(
    fd: RawFd,
    opts: &Opts,
    udp: bool,
    mut round: impl FnMut(u64) -> io::Result<()>,
) -> i32 {
    let interval = opts.interval.as_nanos() as u64;
    let mut next = mono_ns();
    let mut i = 0u64;
    loop {
        i += 1;
        if opts.rounds != 0 && i > opts.rounds {
            break;
        }
        if let Err(e) = session_pace(fd, next, udp) {
            let now = mono_ns();
            say(&format!(
                "round {i} fail {now} {now} {}",
                session_err_name(&e)
            ));
            return fail(&format!("before round {i}"), &e);
        }
        let sent = mono_ns();
        next = sent + interval;
        match round(i) {
            Ok(()) => {
                let rtt_us = (mono_ns() - sent) / 1000;
                say(&format!("round {i} ok {sent} {rtt_us}"));
            }
            Err(e) => {
                let detected = mono_ns();
                say(&format!(
                    "round {i} fail {sent} {detected} {}",
                    session_err_name(&e)
                ));
                return fail(&format!("round {i}"), &e);
            }
        }
    }
    say("ok");
    EXIT_OK
}

/// A client socket of `ty` for a session: optional bind, I/O deadlines, connect, then prints
/// `connected <local> <peer>`.
fn session_socket(addr: SocketAddr, opts: &Opts, ty: libc::c_int) -> Result<OwnedFd, i32> {
    let fd = new_socket(&addr, ty).map_err(|e| fail("socket", &e))?;
    if let Some(b) = opts.bind {
        bind(fd.as_raw_fd(), &b).map_err(|e| fail(&format!("bind {b}"), &e))?;
    }
    set_timeout(fd.as_raw_fd(), libc::SO_SNDTIMEO, opts.timeout)
        .and_then(|()| set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, opts.timeout))
        .map_err(|e| fail("setsockopt timeout", &e))?;
    connect(fd.as_raw_fd(), &addr).map_err(|e| fail(&format!("connect {addr}"), &e))?;
    let local = local_addr(fd.as_raw_fd()).map_err(|e| fail("getsockname", &e))?;
    say(&format!("connected {local} {addr}"));
    Ok(fd)
}

/// A TCP server echoing every line of each connection until the peer closes it.
fn tcp_echo(addr: SocketAddr) -> i32 {
    let fd = match server_socket(addr, libc::SOCK_STREAM) {
        Ok(fd) => fd,
        Err(code) => return code,
    };
    let listener = TcpListener::from(fd);
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                say(&format!("accepted {peer}"));
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match reader.read_line(&mut line) {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                if (&stream).write_all(line.as_bytes()).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn tcp_session(addr: SocketAddr, opts: &Opts) -> i32 {
    let fd = match session_socket(addr, opts, libc::SOCK_STREAM) {
        Ok(fd) => fd,
        Err(code) => return code,
    };
    let raw = fd.as_raw_fd();
    let stream = TcpStream::from(fd);
    let mut reader = BufReader::new(&stream);
    let pid = std::process::id();
    session_rounds(raw, opts, false, |i| {
        let msg = format!("ztai-probe session {pid} {i}\n");
        (&stream).write_all(msg.as_bytes())?;
        let mut reply = String::new();
        if reader.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed the connection",
            ));
        }
        if reply != msg {
            return Err(io::Error::other(format!(
                "echo mismatch: sent {msg:?}, got {reply:?}"
            )));
        }
        Ok(())
    })
}

fn udp_session(addr: SocketAddr, opts: &Opts) -> i32 {
    let fd = match session_socket(addr, opts, libc::SOCK_DGRAM) {
        Ok(fd) => fd,
        Err(code) => return code,
    };
    let raw = fd.as_raw_fd();
    let sock = UdpSocket::from(fd);
    let pid = std::process::id();
    let timeout = opts.timeout.as_nanos() as u64;
    session_rounds(raw, opts, true, |i| {
        let payload = format!("ztai-probe session {pid} {i}");
        sock.send(payload.as_bytes())?;
        let deadline = mono_ns() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let now = mono_ns();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply within {:?}", opts.timeout),
                ));
            }
            let revents = poll_in(raw, deadline - now)?;
            if revents == 0 {
                continue;
            }
            if revents & libc::POLLERR != 0 {
                return Err(socket_error(raw));
            }
            match sock.recv(&mut buf) {
                // A late reply to an earlier round is skipped.
                Ok(n) if &buf[..n] == payload.as_bytes() => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// `tcp-loop ADDR [ADDR...] [--timeout-ms MS] [--interval-ms MS] [--rounds N]`: attempt after
/// attempt, round-robin over the addresses, each a fresh TCP socket doing connect + one echo round
/// trip (against `tcp-listen`) with an I/O deadline of `--timeout-ms` (default 1000). Attempt
/// starts are `--interval-ms` apart (default 5); `--rounds N` stops after N attempts (default 0:
/// until killed). Prints `looping <n> targets`, then one line per attempt:
/// `attempt <i> <addr> ok <start_ns> <end_ns>` or
/// `attempt <i> <addr> err <ERRNO_NAME> <start_ns> <end_ns> <message>` (CLOCK_MONOTONIC ns).
fn tcp_loop(args: &[String]) -> i32 {
    let mut targets: Vec<SocketAddr> = Vec::new();
    let mut timeout = Duration::from_millis(1000);
    let mut interval = Duration::from_millis(5);
    let mut rounds: u64 = 0;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--timeout-ms" => {
                let ms: u64 = number(&mut it, "--timeout-ms");
                if ms == 0 {
                    usage("--timeout-ms must be more than 0");
                }
                timeout = Duration::from_millis(ms);
            }
            "--interval-ms" => interval = Duration::from_millis(number(&mut it, "--interval-ms")),
            "--rounds" => rounds = number(&mut it, "--rounds"),
            other if other.starts_with("--") => {
                usage(&format!("unknown tcp-loop option {other:?}"))
            }
            addr => targets.push(
                addr.parse()
                    .unwrap_or_else(|e| usage(&format!("bad ADDR:PORT {addr:?}: {e}"))),
            ),
        }
    }
    if targets.is_empty() {
        usage("tcp-loop needs at least one ADDR:PORT");
    }
    say(&format!("looping {} targets", targets.len()));
    let pid = std::process::id();
    let interval_ns = interval.as_nanos() as u64;
    let mut i = 0u64;
    while rounds == 0 || i < rounds {
        let addr = targets[(i % targets.len() as u64) as usize];
        i += 1;
        let start = loop_clock_ns();
        let result = tcp_loop_attempt(addr, timeout, pid, i);
        let end = loop_clock_ns();
        match result {
            Ok(()) => say(&format!("attempt {i} {addr} ok {start} {end}")),
            Err(e) => say(&format!(
                "attempt {i} {addr} err {} {start} {end} {e}",
                loop_err_name(&e)
            )),
        }
        let next = start + interval_ns;
        let now = loop_clock_ns();
        if next > now {
            std::thread::sleep(Duration::from_nanos(next - now));
        }
    }
    say("ok");
    EXIT_OK
}

/// One `tcp-loop` attempt: new socket, connect, one echoed line.
fn tcp_loop_attempt(addr: SocketAddr, timeout: Duration, pid: u32, i: u64) -> io::Result<()> {
    let fd = new_socket(&addr, libc::SOCK_STREAM)?;
    set_timeout(fd.as_raw_fd(), libc::SO_SNDTIMEO, timeout)?;
    set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, timeout)?;
    connect(fd.as_raw_fd(), &addr)?;
    let stream = TcpStream::from(fd);
    let msg = format!("ztai-probe loop {pid} {i}\n");
    (&stream).write_all(msg.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    if reply != msg {
        return Err(io::Error::other(format!(
            "echo mismatch: sent {msg:?}, got {reply:?}"
        )));
    }
    Ok(())
}

/// Errno name of a failed `tcp-loop` attempt (deadlines as `ETIMEDOUT`, like [`fail`]).
fn loop_err_name(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => "ETIMEDOUT",
        Some(n) => errno_name(n),
        None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT",
        None => "EOTHER",
    }
}

/// CLOCK_MONOTONIC in nanoseconds (for `tcp-loop` lines).
fn loop_clock_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid storage; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Options of `raw-recv` / `raw-send`: `IPV4 --proto N [--proto M...] [--bind IPV4]`.
struct RawArgs {
    addr: std::net::Ipv4Addr,
    protos: Vec<u8>,
    bind: Option<std::net::Ipv4Addr>,
}

fn raw_args(cmd: &str, args: &[String]) -> RawArgs {
    let ipv4 = |a: &str, what: &str| -> std::net::Ipv4Addr {
        a.parse()
            .unwrap_or_else(|e| usage(&format!("{cmd}: bad {what} {a:?} (an IPv4 address): {e}")))
    };
    let Some((addr, flags)) = args.split_first() else {
        usage(&format!("{cmd}: missing IPV4"))
    };
    let mut r = RawArgs {
        addr: ipv4(addr, "IPV4"),
        protos: Vec::new(),
        bind: None,
    };
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        match f.as_str() {
            "--proto" => r.protos.push(number(&mut it, "--proto")),
            "--bind" => {
                let a = it.next().unwrap_or_else(|| usage("--bind needs IPV4"));
                // `IP:0` too, as the tests' builder passes socket addresses.
                r.bind = Some(ipv4(a.strip_suffix(":0").unwrap_or(a), "--bind"));
            }
            other => usage(&format!("unknown {cmd} option {other:?}")),
        }
    }
    if r.protos.is_empty() {
        usage(&format!("{cmd} needs --proto N"));
    }
    r
}

fn raw_socket(proto: u8) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the fd is immediately owned.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(proto),
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The printable form of a payload: text, anything else as '.'.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect()
}

/// `raw-recv IPV4 --proto N [--proto M...]`: see the module docs.
fn raw_recv(args: &[String]) -> i32 {
    let a = raw_args("raw-recv", args);
    let mut socks = Vec::new();
    for &proto in &a.protos {
        let fd = match raw_socket(proto) {
            Ok(fd) => fd,
            Err(e) => return fail(&format!("socket(AF_INET, SOCK_RAW, {proto})"), &e),
        };
        if !a.addr.is_unspecified()
            && let Err(e) = bind(fd.as_raw_fd(), &SocketAddr::from((a.addr, 0)))
        {
            return fail(&format!("bind {}", a.addr), &e);
        }
        socks.push((proto, fd));
    }
    let list: Vec<String> = a.protos.iter().map(u8::to_string).collect();
    say(&format!("listening {} proto {}", a.addr, list.join(",")));
    let mut fds: Vec<libc::pollfd> = socks
        .iter()
        .map(|(_, fd)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = [0u8; 65536];
    loop {
        // SAFETY: `fds` is a live array of pollfds of the given length.
        if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return fail("poll", &e);
        }
        // Drain in the order given, whichever socket woke us.
        for (proto, fd) in &socks {
            loop {
                // SAFETY: recv into a local buffer of the given length.
                let n = unsafe {
                    libc::recv(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::WouldBlock => break,
                        io::ErrorKind::Interrupted => continue,
                        _ => return fail(&format!("recv (proto {proto})"), &e),
                    }
                }
                let pkt = &buf[..n as usize];
                // An AF_INET raw socket receives the IP header too.
                let ihl = pkt.first().map_or(0, |b| usize::from(b & 0x0f) * 4);
                if pkt.len() < 20 || ihl < 20 || pkt.len() < ihl {
                    say(&format!("recv {proto} ? short packet of {n} bytes"));
                    continue;
                }
                let src = std::net::Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
                let mut payload = &pkt[ihl..];
                if *proto == 1 {
                    payload = payload.get(8..).unwrap_or_default();
                }
                say(&format!("recv {proto} {src} {}", printable(payload)));
            }
        }
    }
}

/// Internet checksum (RFC 1071) of `data`.
fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `raw-send IPV4 --proto N [--bind IPV4]`: see the module docs.
fn raw_send(args: &[String]) -> i32 {
    let a = raw_args("raw-send", args);
    if a.protos.len() != 1 {
        usage("raw-send takes one --proto");
    }
    let proto = a.protos[0];
    let fd = match raw_socket(proto) {
        Ok(fd) => fd,
        Err(e) => return fail(&format!("socket(AF_INET, SOCK_RAW, {proto})"), &e),
    };
    if let Some(b) = a.bind {
        let b = SocketAddr::from((b, 0));
        if let Err(e) = bind(fd.as_raw_fd(), &b) {
            return fail(&format!("bind {b}"), &e);
        }
        say(&format!("bound {b}"));
    }
    let text = format!("ztai-probe raw {}", std::process::id());
    let packet = if proto == 1 {
        // ICMP echo request: type 8, code 0, checksum, identifier, sequence 1, then the text.
        let mut p = vec![8, 0, 0, 0];
        p.extend_from_slice(&(std::process::id() as u16).to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(text.as_bytes());
        let sum = inet_checksum(&p);
        p[2..4].copy_from_slice(&sum.to_be_bytes());
        p
    } else {
        text.into_bytes()
    };
    let (ss, len) = to_sockaddr(&SocketAddr::from((a.addr, 0)));
    // SAFETY: `packet` is a live buffer; ss/len describe a valid sockaddr.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if n < 0 {
        return fail(
            &format!("sendto {} (proto {proto})", a.addr),
            &io::Error::last_os_error(),
        );
    }
    say(&format!("sent {n} bytes"));
    say("ok");
    EXIT_OK
}
