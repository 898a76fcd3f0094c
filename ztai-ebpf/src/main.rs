//! ztai kernel side: entry points only. Each hook's logic lives in the module
//! of its family (`sock_addr`, `sock`); identity, verdict and events are shared.
#![no_std]
#![no_main]

mod addr;
mod events;
mod flows;
mod identity;
mod maps;
mod sock;
mod sock_addr;
mod skb;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use ztai_common::{HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6};

// connect4/6 (kernel 4.17): the verdict for TCP connections and connected UDP.
#[cgroup_sock_addr(connect4)]
pub fn ztai_connect4(ctx: SockAddrContext) -> i32 {
    sock_addr::authorize_egress::<false>(&ctx, HOOK_CONNECT4)
}

#[cgroup_sock_addr(connect6)]
pub fn ztai_connect6(ctx: SockAddrContext) -> i32 {
    sock_addr::authorize_egress::<true>(&ctx, HOOK_CONNECT6)
}

// sendmsg4/6 (4.18): every datagram of an unconnected UDP socket; the kernel
// skips it for connected sockets, which connect4/6 already judged.
#[cgroup_sock_addr(sendmsg4)]
pub fn ztai_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::authorize_egress::<false>(&ctx, HOOK_SENDMSG4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ztai_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::authorize_egress::<true>(&ctx, HOOK_SENDMSG6)
}

// recvmsg4/6 (5.2): a UDP server learns who it talks to, so its sendto() back
// is judged as a reply, not as a new flow.
#[cgroup_sock_addr(recvmsg4)]
pub fn ztai_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::record_udp_exchange::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ztai_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::record_udp_exchange::<true>(&ctx)
}

// post_bind4/6 (4.17): records which cgroup owns each bound socket, the only
// trustworthy identity of a local destination.
#[cgroup_sock(post_bind4)]
pub fn ztai_post_bind4(ctx: SockContext) -> i32 {
    sock::record_bound_socket4(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn ztai_post_bind6(ctx: SockContext) -> i32 {
    sock::record_bound_socket6(&ctx)
}

// sock_release (5.9): forgets the owner when the socket closes, so a port
// reused later by someone else never inherits the old identity.
#[cgroup_sock(sock_release)]
pub fn ztai_sock_release(ctx: SockContext) -> i32 {
    sock::forget_released_socket(&ctx)
}

// cgroup_skb ingress/egress (4.10): per-flow counters, and the inbound
// verdict for connections started outside the attach point.
#[cgroup_skb(ingress)]
pub fn ztai_skb_ingress(ctx: SkBuffContext) -> i32 {
    skb::ingress(&ctx)
}

#[cgroup_skb(egress)]
pub fn ztai_skb_egress(ctx: SkBuffContext) -> i32 {
    skb::egress(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
