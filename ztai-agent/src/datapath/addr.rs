//! The kernel's address form: 4 words in network byte order, IPv4 mapped.
use std::net::{IpAddr, Ipv6Addr};

pub fn words_from_ip(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]))
}

/// IPv4-mapped addresses come back as IPv4, as a person would write them.
pub fn ip_from_words(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_through_the_mapped_form() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let w = words_from_ip(ip);
        assert_eq!(w[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(w[3].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(ip_from_words(w), ip);
    }

    #[test]
    fn v6_round_trips() {
        let ip: IpAddr = "fd5a:7a1e::1".parse().unwrap();
        assert_eq!(ip_from_words(words_from_ip(ip)), ip);
    }
}
