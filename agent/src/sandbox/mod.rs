//! The host side of a job's sandbox: its cgroup, its network namespace, its tmpfs and its
//! user. The inside (namespaces, mounts, capabilities, seccomp) is `airlock-shim`'s job.

pub mod addr_pool;
pub mod cgroup;
pub mod firewall;
pub mod forwarding;
pub mod job;
pub mod jobfs;
pub mod netns;
pub mod users;
