//! This host's own addresses, which make a destination local (its identity is
//! then the owner of the socket it reaches, not a cidrs prefix). Changes are
//! signalled by rtnetlink address events, so nothing polls.
use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// Every address configured on an interface of the agent's network namespace.
pub fn host_addresses() -> io::Result<BTreeSet<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = BTreeSet::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: walking the list getifaddrs returned; addresses are checked for null and family.
        unsafe {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.insert(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The kernel's cookie for the agent's network namespace (SO_NETNS_COOKIE,
/// Linux 5.14), the same value `bpf_get_netns_cookie` returns in programs.
pub fn own_netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain socket syscall; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len point to valid storage of the stated size.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::other(format!(
            "SO_NETNS_COOKIE failed ({}); ztai needs Linux 5.14 or newer",
            io::Error::last_os_error()
        )));
    }
    Ok(cookie)
}

/// A netlink socket subscribed to IPv4/IPv6 address changes; readable means
/// "rescan". Messages are drained, not parsed: a full rescan is cheap and
/// cannot miss anything a parser might.
pub struct AddressEvents {
    fd: OwnedFd,
}

impl AddressEvents {
    pub fn subscribe() -> io::Result<Self> {
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        const RTMGRP_IPV6_IFADDR: u32 = 0x100;
        // SAFETY: plain socket syscall.
        let fd = unsafe {
            libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, libc::NETLINK_ROUTE)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_nl is valid; fields set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_nl).cast(), std::mem::size_of::<libc::sockaddr_nl>() as u32)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Reads everything pending; returns whether anything was there.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut any = false;
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                // EAGAIN (drained) or ENOBUFS (overrun: a rescan covers it).
                return any || n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS);
            }
            any = true;
        }
    }
}

impl AsRawFd for AddressEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_among_host_addresses() {
        let addrs = host_addresses().expect("getifaddrs");
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
