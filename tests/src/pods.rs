//! Pod-style workloads: processes in their own network namespaces, joined at L2 by a bridge that
//! lives in a separate "switch" namespace — nothing is added to the host's namespace and no host
//! sysctl (ip_forward, bridge-nf-*) is touched.
//!
//! Layout for slot `k` (the same host-wide slot lock as [`crate::RemoteHost`], so subnets never
//! overlap between parallel tests):
//!
//! | what | where |
//! |---|---|
//! | switch namespace | `ztai-n<pid>-<n>` with bridge `br0` and one port `p<i>` per pod |
//! | pod `i` | `ztai-n<pid>-<n>` with `eth0` (the peer of `p<i>`) |
//! | pod `i` addresses | 198.18.k.(10+i)/24, fd5a:7a1e:0:k::(10+i)/64 |
//! | extra addresses | 198.18.k.(100+j), fd5a:7a1e:0:k::(100+j) via [`Pod::add_addr`] |
//!
//! Drop order: pods, then the switch, then the slot. Start probes inside the pods after creating
//! the network, so they are dropped (killed) first.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Netns;
use crate::netns::{SETUP_TIMEOUT, SlotLock};
use crate::util::wait_until;

/// One pod: a namespace with `eth0` on the pod network.
#[derive(Debug)]
pub struct Pod {
    ns: Netns,
    slot: u32,
    index: u8,
}

impl Pod {
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// 198.18.k.(10+i)
    pub fn v4(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.slot as u8, 10 + self.index))
    }

    /// fd5a:7a1e:0:k::(10+i)
    pub fn v6(&self) -> IpAddr {
        v6(self.slot, 0x10 + u16::from(self.index))
    }

    /// Extra address number `j` of the pod network (198.18.k.(100+j) / fd5a:7a1e:0:k::(100+j)),
    /// not assigned until [`Pod::add_addr`].
    pub fn extra_v4(&self, j: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.slot as u8, 100 + j))
    }

    pub fn extra_v6(&self, j: u8) -> IpAddr {
        v6(self.slot, 0x100 + u16::from(j))
    }

    /// Adds `ip` (from [`Pod::extra_v4`] / [`Pod::extra_v6`]) to `eth0`.
    #[track_caller]
    pub fn add_addr(&self, ip: IpAddr) {
        match ip {
            IpAddr::V4(_) => self
                .ns
                .ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]),
            IpAddr::V6(_) => self.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{ip}/64"),
                "dev",
                "eth0",
                "nodad",
            ]),
        };
    }

    /// Removes `ip` from `eth0`.
    #[track_caller]
    pub fn del_addr(&self, ip: IpAddr) {
        let prefix = if ip.is_ipv4() { 24 } else { 64 };
        self.ns
            .ip(&["addr", "del", &format!("{ip}/{prefix}"), "dev", "eth0"]);
    }
}

fn v6(slot: u32, host: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd5a, 0x7a1e, 0, slot as u16, 0, 0, 0, host))
}

/// Pods joined by a bridge in a "switch" namespace.
#[derive(Debug)]
pub struct PodNetwork {
    pods: Vec<Pod>,
    switch: Netns,
    slot: SlotLock,
}

impl PodNetwork {
    /// Creates `n` (1..=80) pods on one L2 segment, addressed and up.
    #[track_caller]
    pub fn new(n: usize) -> PodNetwork {
        assert!((1..=80).contains(&n), "1..=80 pods");
        let slot = SlotLock::acquire();
        let switch = Netns::new();
        switch.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ]);
        switch.ip(&["link", "set", "br0", "up"]);
        let mut net = PodNetwork {
            pods: Vec::new(),
            switch,
            slot,
        };
        for i in 0..n {
            let ns = Netns::new();
            let port = format!("p{i}");
            net.switch.ip(&[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ]);
            net.switch
                .ip(&["link", "set", &port, "master", "br0", "up"]);
            let pod = Pod {
                ns,
                slot: net.slot.k,
                index: i as u8,
            };
            pod.ns.ip(&["link", "set", "eth0", "up"]);
            pod.ns
                .ip(&["addr", "add", &format!("{}/24", pod.v4()), "dev", "eth0"]);
            pod.ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", pod.v6()),
                "dev",
                "eth0",
                "nodad",
            ]);
            net.pods.push(pod);
        }
        for (i, pod) in net.pods.iter().enumerate() {
            wait_until(
                &format!("pod {i} eth0 and switch port p{i} to come up"),
                SETUP_TIMEOUT,
                || {
                    let pod_up = pod
                        .ns
                        .ip(&["-o", "link", "show", "dev", "eth0"])
                        .contains("state UP");
                    let port = net
                        .switch
                        .ip(&["-o", "link", "show", "dev", &format!("p{i}")]);
                    (pod_up && port.contains("state UP")).then_some(())
                },
            );
        }
        net
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    pub fn slot(&self) -> u32 {
        self.slot.k
    }

    /// 198.18.k.0/24
    pub fn v4_cidr(&self) -> String {
        format!("198.18.{}.0/24", self.slot.k)
    }

    /// fd5a:7a1e:0:k::/64
    pub fn v6_cidr(&self) -> String {
        format!("fd5a:7a1e:0:{:x}::/64", self.slot.k)
    }
}
