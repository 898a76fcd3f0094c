//! Addresses as 4 words in network byte order; IPv4 is IPv4-mapped so one key
//! layout serves both families and v4-mapped IPv6 equals plain IPv4.

pub type Addr = [u32; 4];

/// Word 2 of `::ffff:a.b.c.d`: the bytes 00 00 ff ff in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
pub fn v4_mapped(ip4_be: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4_be]
}

#[inline(always)]
pub fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

/// Loopback (127/8, ::1) and the unspecified address (which connect() treats
/// as "this host") always mean a local destination.
#[inline(always)]
pub fn is_always_local(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        let first = a[3].to_ne_bytes()[0];
        first == 127 || a[3] == 0
    } else {
        a[0] == 0 && a[1] == 0 && a[2] == 0 && (a[3] == 0 || a[3] == u32::from_ne_bytes([0, 0, 0, 1]))
    }
}

#[inline(always)]
pub fn to_bytes(a: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}
