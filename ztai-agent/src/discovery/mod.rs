//! What exists on the node: the cgroup2 mount and its cgroups, this host's
//! addresses, sockets that were bound before the agent started, and what the
//! agent itself is allowed to see of them.
pub mod capabilities;
pub mod cgroup_watch;
pub mod cgroups;
pub mod kernel;
pub mod local_addrs;
pub mod policy_file;
pub mod sockets;
pub mod workloads;
