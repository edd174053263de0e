//! A job's network: its own named network namespace (`/run/netns/airlock-<job>`, made the
//! way iproute2 makes one, so `ip netns list` shows it), a veth pair with a /30 from the
//! address pool, the two metadata addresses the SDKs use on its loopback, and the sockets of
//! the job's credential endpoint bound *inside* it — so the listener a request arrives on
//! identifies the job.
//!
//! Everything is done over rtnetlink and plain syscalls; this module never runs `ip`. Every
//! namespace switch (`unshare`, `setns`) happens on a dedicated OS thread that exits right
//! after, never on a tokio worker: a worker left in a job's namespace would serve the next
//! task in the wrong network. This module owns kernel objects named `airlock-*` (namespace
//! files) and `al-*` (host links); it never touches anything else on the host.

use super::addr_pool;
use super::firewall::{self, FirewallError};
pub use addr_pool::{AddressPool, Cidr, PoolError, Subnet, DEFAULT_POOL};

use futures_util::TryStreamExt;
use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::jobs::valid_job_id;

/// Where iproute2 keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Namespace files of jobs are `airlock-<job id>`.
pub const NETNS_PREFIX: &str = "airlock-";
/// Host ends of job veths are `al-<10 hex digits>h` (link names have at most 15 bytes).
pub const LINK_PREFIX: &str = "al-";
/// The host end's alias names its job, so crash recovery can tell whose link it is.
const LINK_ALIAS_PREFIX: &str = "airlock job ";
/// The job's end of the veth, inside its namespace.
pub const JOB_LINK: &str = "eth0";
/// Container credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
pub const CONTAINER_ENDPOINT: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 170, 2), 80));
/// IMDSv2 endpoint.
pub const IMDS_ENDPOINT: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80));
/// The resolver of an egress-controlled job (the agent, inside the job's namespace).
pub const RESOLVER_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 53);
/// Both endpoint sockets of a job, as [`bind_in_netns`] takes them.
pub const ENDPOINT_ADDRS: [SocketAddr; 2] = [CONTAINER_ENDPOINT, IMDS_ENDPOINT];

/// Errors of the per-job network.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{0:?} is not an airlock job id (\"j-\" and 16 hex digits)")]
    InvalidJobId(String),
    #[error("the network manager must be created inside a tokio runtime")]
    NoRuntime,
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(
        "cannot prepare {path} as a shared mount for network namespaces: {source}; airlockd must run as root (CAP_SYS_ADMIN)"
    )]
    NetnsDir { path: PathBuf, source: nix::Error },
    #[error(
        "network namespace {0} already exists: a job with this id runs or was not cleaned up; reap orphans first"
    )]
    Exists(PathBuf),
    #[error("cannot create namespace file {path}: {source}")]
    NamespaceFile { path: PathBuf, source: io::Error },
    #[error("cannot create a network namespace (unshare CLONE_NEWNET): {0}; airlockd must run as root (CAP_SYS_ADMIN)")]
    Unshare(nix::Error),
    #[error("cannot set {path} in the job's namespace: {source}")]
    Sysctl { path: PathBuf, source: io::Error },
    #[error("cannot bind-mount the new network namespace on {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("cannot unmount network namespace {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}; is it a network namespace file?")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("cannot open a netlink socket: {0}")]
    NetlinkSocket(io::Error),
    #[error("netlink: cannot {what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("link {0} does not exist")]
    NoLink(String),
    #[error("cannot bind {addr} inside network namespace {path}: {source}")]
    Bind {
        addr: SocketAddr,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the helper thread for network namespace {0} could not start or panicked")]
    Thread(PathBuf),
    #[error("firewall: {0}")]
    Firewall(#[from] FirewallError),
    #[error("no job subnet clear of the host's addresses: {0}; give [sandbox] address_pool a range the host does not use")]
    PoolClash(String),
    #[error("{0:?} is not an airlock-owned object (only {NETNS_PREFIX}* namespaces and {LINK_PREFIX}* links are)")]
    NotOurs(String),
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetnsError {
    let what = what.into();
    move |source| NetnsError::Netlink { what, source }
}

/// What a job's network lets it reach.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetMode {
    /// The job reaches its own endpoint and nothing else. Its namespace has a loopback with
    /// the two metadata addresses and no other link at all: no route leaves it, so not the
    /// host, not another job, not the internet. (No veth: a link that may carry nothing is
    /// only attack surface, and deleting one costs the wipe ~30 ms of kernel time.)
    EndpointOnly,
    /// The job also reaches the internet through a veth to the host, masqueraded there,
    /// except the metadata service, link-local, private and other special ranges and the
    /// host's own addresses (see `firewall`).
    Outbound,
    /// Like `Outbound`, but the job reaches only what its policy's `[rule.egress]` allows
    /// (or, in audit mode, everything but the blocked ranges, every connection logged);
    /// its resolver is the agent (see `crate::egress`).
    Egress(firewall::EgressRules),
}

impl NetMode {
    /// Whether the job has a link off its namespace (a veth and a /30).
    pub fn has_link(&self) -> bool {
        !matches!(self, NetMode::EndpointOnly)
    }
}

impl fmt::Display for NetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetMode::EndpointOnly => "endpoint-only",
            NetMode::Outbound => "outbound",
            NetMode::Egress(r) if r.audit => "egress-audit",
            NetMode::Egress(_) => "egress-block",
        })
    }
}

/// Where the per-job network lives; paths are parameters so tests can move them.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Directory of named namespaces; `ip netns` only sees `/run/netns`.
    pub netns_dir: PathBuf,
    /// The range jobs' /30s come from.
    pub pool: Cidr,
    /// The range outbound and egress jobs' IPv6 /126s come from; none: IPv6 stays off in
    /// every job.
    pub pool6: Option<addr_pool::Pool6>,
    /// procfs, for the leftover-process check.
    pub proc_dir: PathBuf,
    /// Whose forwarding the host table leaves alone (see `forwarding`).
    pub forwarding: super::forwarding::ForwardingConfig,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            netns_dir: NETNS_DIR.into(),
            pool: DEFAULT_POOL.parse().expect("DEFAULT_POOL parses"),
            pool6: None,
            proc_dir: "/proc".into(),
            forwarding: Default::default(),
        }
    }
}

/// Name of the job's namespace (`ip netns exec <name>`).
pub fn netns_name(job: &str) -> String {
    format!("{NETNS_PREFIX}{job}")
}

/// Name of the host end of the job's veth: `al-` + 10 hex digits of SHA-256(job) + `h`.
pub fn host_link_name(job: &str) -> String {
    let digest = hex::encode(Sha256::digest(job.as_bytes()));
    format!("{LINK_PREFIX}{}h", &digest[..10])
}

fn check_job(job: &str) -> Result<(), NetnsError> {
    if valid_job_id(job) {
        Ok(())
    } else {
        Err(NetnsError::InvalidJobId(job.to_string()))
    }
}

/// One job's network, as built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobNet {
    pub job_id: String,
    pub mode: NetMode,
    /// `/run/netns/airlock-<job>`: what the shim joins and [`bind_in_netns`] enters.
    pub ns_path: PathBuf,
    /// Host end of the veth (in the host namespace); outbound jobs only.
    pub host_link: Option<String>,
    /// The job's /30 from the pool; outbound jobs only.
    pub subnet: Option<Subnet>,
    /// The job's IPv6 /126, beside its /30; outbound jobs of an agent with an IPv6 pool.
    pub subnet6: Option<addr_pool::Subnet6>,
    /// Inode of the namespace (as in `/proc/<pid>/ns/net` → `net:[inode]`).
    pub ns_inode: u64,
}

impl JobNet {
    /// The job's own address on its `eth0` (outbound jobs only).
    pub fn job_addr(&self) -> Option<Ipv4Addr> {
        self.subnet.map(|s| s.job_addr())
    }

    /// The job's own IPv6 address on its `eth0`, if it has IPv6.
    pub fn job_addr6(&self) -> Option<Ipv6Addr> {
        self.subnet6.map(|s| s.job_addr())
    }
}

/// Something of a job that is still there after its teardown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    Link(String),
    NamespaceFile(PathBuf),
    NamespaceMount(PathBuf),
    /// A process still in the job's namespace (it keeps the namespace alive).
    Process(i32),
    /// Entries for the job's link still in the host's exceptions set.
    Exceptions(String, usize),
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Leftover::Link(name) => write!(f, "link {name}"),
            Leftover::NamespaceFile(p) => write!(f, "namespace file {}", p.display()),
            Leftover::NamespaceMount(p) => write!(f, "namespace mount {}", p.display()),
            Leftover::Process(pid) => write!(f, "process {pid} in the job's network namespace"),
            Leftover::Exceptions(link, n) => write!(
                f,
                "{n} entr{} for link {link} in the host's nftables set {}",
                if *n == 1 { "y" } else { "ies" },
                firewall::EXCEPTIONS_SET
            ),
        }
    }
}

/// Airlock-owned network objects that no job of this manager holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Orphans {
    pub namespaces: Vec<OrphanNamespace>,
    pub links: Vec<OrphanLink>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanNamespace {
    /// File name under the namespace directory (`airlock-…`).
    pub name: String,
    /// The job it was made for, if the name holds a valid job id.
    pub job_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanLink {
    pub name: String,
    /// The job named by the link's alias, if any.
    pub job_id: Option<String>,
}

#[derive(Debug)]
struct State {
    pool: AddressPool,
    /// Namespace inodes of jobs not yet verified gone.
    inodes: HashMap<String, u64>,
    /// A torn-down job's namespace, held open from teardown until `verify_gone`: while it
    /// is held its inode cannot be given to a new namespace, so the process check cannot
    /// mistake another job's processes for this job's leftovers.
    held: HashMap<String, File>,
    /// Each egress job's explicit entries in the host's exceptions set, until its teardown.
    exceptions: HashMap<String, Vec<(Ipv4Addr, u8, u16)>>,
}

/// Builds and removes jobs' networks. One per agent; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct NetManager {
    cfg: NetConfig,
    /// rtnetlink in the host namespace.
    handle: rtnetlink::Handle,
    conn: tokio::task::JoinHandle<()>,
    state: Mutex<State>,
    /// This manager bound the namespace directory onto itself (as `ip netns` does) and
    /// takes that mount away again in [`NetManager::release_dir`].
    bound_dir: std::sync::atomic::AtomicBool,
    /// Serialises netlink dumps on `handle`.
    dumps: tokio::sync::Mutex<()>,
}

impl Drop for NetManager {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// Aborts a netlink connection task when the request that needed it is done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the namespace thread hands back.
struct NewNamespace {
    inode: u64,
    conn: rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>,
    handle: rtnetlink::Handle,
}

impl NetManager {
    /// Must be called inside a tokio runtime (it spawns the netlink connection task).
    pub fn new(cfg: NetConfig) -> Result<NetManager, NetnsError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetnsError::NoRuntime)?;
        let pool = AddressPool::new(cfg.pool)?;
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetnsError::NetlinkSocket)?;
        let conn = rt.spawn(conn);
        let cfg_dir = cfg.netns_dir.clone();
        Ok(NetManager {
            cfg,
            handle,
            conn,
            state: Mutex::new(State {
                pool,
                inodes: HashMap::new(),
                held: HashMap::new(),
                exceptions: HashMap::new(),
            }),
            // A bind an earlier agent made (and a crash left) is this agent's to release.
            bound_dir: std::sync::atomic::AtomicBool::new(dir_is_self_bind(&cfg_dir)),
            dumps: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain bookkeeping behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Path of the job's namespace file.
    pub fn ns_path(&self, job: &str) -> PathBuf {
        self.cfg.netns_dir.join(netns_name(job))
    }

    /// Free subnets left in the pool.
    pub fn available_subnets(&self) -> usize {
        self.state().pool.available()
    }

    /// A /30 for the job that no address on the host lies in. The pool should be clear of
    /// the host's networks, but another agent with the same pool, or a network added after
    /// the agent started, would give two links the same addresses, and the host would route
    /// one job's replies to the other: such subnets are skipped (and logged), and a pool
    /// that overlaps a network of the host is an error naming it.
    async fn allocate_clear_subnet(&self, job: &str) -> Result<Subnet, NetnsError> {
        const TRIES: usize = 8;
        let all = self.host_networks().await?;
        if let Some(pool6) = self.cfg.pool6 {
            if let Some((link, addr, prefix)) = all.iter().find(|(link, addr, prefix)| {
                !link.starts_with(LINK_PREFIX)
                    && matches!(addr, IpAddr::V6(a) if pool6.overlaps(*a, *prefix))
            }) {
                return Err(NetnsError::PoolClash(format!(
                    "the host has {addr}/{prefix} on {link} inside the IPv6 job address pool {pool6}"
                )));
            }
        }
        let host: Vec<(String, Ipv4Addr, u8)> = all
            .into_iter()
            .filter_map(|(link, addr, prefix)| match addr {
                IpAddr::V4(a) => Some((link, a, prefix)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut skipped = Vec::new();
        let mut found = Err(NetnsError::PoolClash(String::new()));
        for i in 0..TRIES {
            let subnet = match self.state().pool.allocate(job) {
                Ok(s) => s,
                Err(e) => {
                    found = Err(e.into());
                    break;
                }
            };
            let (lo, hi) = subnet.cidr().range();
            let clash = host.iter().find(|(_, addr, prefix)| {
                let net = Cidr {
                    addr: *addr,
                    prefix: *prefix,
                };
                let (a, b) = net.range();
                a <= hi && lo <= b
            });
            match clash {
                None => {
                    found = Ok(subnet);
                    break;
                }
                Some((link, addr, prefix)) => {
                    tracing::warn!(job, subnet = %subnet.cidr(), "skipping a job subnet: the host already has {addr}/{prefix} on {link} (another agent with the same address_pool?)");
                    let mut state = self.state();
                    state.pool.release(job);
                    let key = format!("!clash-{job}-{i}");
                    let _ = state.pool.reserve(&key, subnet);
                    skipped.push(key);
                    found = Err(NetnsError::PoolClash(format!(
                        "the host has {addr}/{prefix} on {link} inside the job address pool"
                    )));
                }
            }
        }
        let mut state = self.state();
        for key in skipped {
            state.pool.release(&key);
        }
        found
    }

    /// The host namespace's addresses: (link name, address, prefix length).
    async fn host_networks(&self) -> Result<Vec<(String, IpAddr, u8)>, NetnsError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        // One dump at a time on the shared netlink socket (a second one gets EBUSY).
        let _dump = self.dumps.lock().await;
        let mut names = HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(netlink("list links"))? {
            for attr in msg.attributes {
                if let LinkAttribute::IfName(n) = attr {
                    names.insert(msg.header.index, n);
                }
            }
        }
        let mut out = Vec::new();
        let mut addrs = self.handle.address().get().execute();
        while let Some(msg) = addrs.try_next().await.map_err(netlink("list addresses"))? {
            for attr in &msg.attributes {
                if let AddressAttribute::Local(a) | AddressAttribute::Address(a) = attr {
                    let link = names.get(&msg.header.index).cloned().unwrap_or_default();
                    out.push((link, *a, msg.header.prefix_len));
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Builds the job's network: namespace, veth, addresses. On failure everything made so
    /// far is removed again.
    pub async fn create(&self, job: &str, mode: NetMode) -> Result<JobNet, NetnsError> {
        check_job(job)?;
        if ensure_netns_dir(&self.cfg.netns_dir)? {
            self.bound_dir
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let subnet = if mode.has_link() {
            Some(self.allocate_clear_subnet(job).await?)
        } else {
            None
        };
        match self.build(job, mode, subnet).await {
            Ok(net) => {
                self.state().inodes.insert(job.to_string(), net.ns_inode);
                Ok(net)
            }
            Err(e) => {
                if !matches!(e, NetnsError::Exists(_)) {
                    // Best effort: the original error is the one to report.
                    let _ = self.remove_objects(job).await;
                }
                self.state().pool.release(job);
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        job: &str,
        mode: NetMode,
        subnet: Option<Subnet>,
    ) -> Result<JobNet, NetnsError> {
        let ns_path = self.ns_path(job);
        let rt = tokio::runtime::Handle::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread_path = ns_path.clone();
        std::thread::Builder::new()
            .name("airlock-netns".into())
            .spawn(move || {
                let _ = tx.send(new_namespace(&thread_path, &rt));
            })
            .map_err(|_| NetnsError::Thread(ns_path.clone()))?;
        let ns = rx
            .await
            .map_err(|_| NetnsError::Thread(ns_path.clone()))??;
        let _conn = AbortOnDrop(tokio::spawn(ns.conn));
        let inside = ns.handle;

        // Inside: lo up with the two metadata addresses.
        let lo = link_index(&inside, "lo")
            .await?
            .ok_or_else(|| NetnsError::NoLink("lo".into()))?;
        for ep in ENDPOINT_ADDRS {
            inside
                .address()
                .add(lo, ep.ip(), 32)
                .execute()
                .await
                .map_err(netlink(format!("add {}/32 to lo", ep.ip())))?;
        }
        if matches!(mode, NetMode::Egress(_)) {
            // The job's resolver (the agent), beside its endpoint.
            inside
                .address()
                .add(lo, RESOLVER_IP.into(), 32)
                .execute()
                .await
                .map_err(netlink(format!("add {RESOLVER_IP}/32 to lo")))?;
        }
        set_up(&inside, lo, "lo").await?;
        let subnet6 = subnet.and_then(|s| self.cfg.pool6.map(|p| p.subnet(&s)));
        let host_link = match subnet {
            Some(subnet) => Some(
                self.outbound(job, &ns_path, &inside, (subnet, subnet6), &mode)
                    .await?,
            ),
            None => None,
        };
        Ok(JobNet {
            job_id: job.to_string(),
            mode,
            ns_path,
            host_link,
            subnet,
            subnet6,
            ns_inode: ns.inode,
        })
    }

    /// An outbound job's link: the firewall first (the job's table inside its namespace,
    /// the host's table), then the veth with the job's /30 (and /126, with IPv6) and its
    /// default routes.
    async fn outbound(
        &self,
        job: &str,
        ns_path: &Path,
        inside: &rtnetlink::Handle,
        (subnet, subnet6): (Subnet, Option<addr_pool::Subnet6>),
        mode: &NetMode,
    ) -> Result<String, NetnsError> {
        let path = ns_path.to_path_buf();
        let proc_dir = self.cfg.proc_dir.clone();
        let ipv6 = subnet6.is_some();
        let ruleset = match mode {
            NetMode::Egress(rules) => firewall::job_egress_ruleset(rules, ipv6),
            _ => firewall::job_ruleset(ipv6),
        };
        let forwarding = self.cfg.forwarding.clone();
        tokio::task::spawn_blocking(move || -> Result<(), NetnsError> {
            firewall::apply_in_netns(&path, ruleset, "job's ruleset")?;
            super::forwarding::apply_host_table_and_forward(&forwarding, &proc_dir, ipv6)?;
            Ok(())
        })
        .await
        .map_err(|_| NetnsError::Thread(ns_path.to_path_buf()))??;

        // The veth, with its job end made directly inside the namespace as eth0: it never
        // exists in the host namespace under a name that could clash.
        let host_link = host_link_name(job);
        let ns_file = File::open(ns_path).map_err(|source| NetnsError::Open {
            path: ns_path.to_path_buf(),
            source,
        })?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(JOB_LINK)
            .setns_by_fd(ns_file.as_raw_fd())
            .build();
        let veth = LinkVeth::new(&host_link, JOB_LINK)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(netlink(format!("create veth {host_link}")))?;
        drop(ns_file);
        let host_index = link_index(&self.handle, &host_link)
            .await?
            .ok_or_else(|| NetnsError::NoLink(host_link.clone()))?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(host_index)
                    .alias(format!("{LINK_ALIAS_PREFIX}{job}"))
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("set the alias of {host_link}")))?;
        self.handle
            .address()
            .add(
                host_index,
                IpAddr::V4(subnet.host_addr()),
                addr_pool::JOB_PREFIX,
            )
            .execute()
            .await
            .map_err(netlink(format!(
                "add {} to {host_link}",
                subnet.host_addr()
            )))?;
        if let Some(s6) = subnet6 {
            // Before the link is up: no duplicate address detection (the /126 is the
            // agent's alone, and detection would hold the address back for a second), no
            // router advertisements.
            ipv6_link_knobs(&self.cfg.proc_dir, &host_link)?;
            self.handle
                .address()
                .add(
                    host_index,
                    IpAddr::V6(s6.host_addr()),
                    addr_pool::JOB_PREFIX6,
                )
                .execute()
                .await
                .map_err(netlink(format!("add {} to {host_link}", s6.host_addr())))?;
        }
        set_up(&self.handle, host_index, &host_link).await?;

        let eth0 = link_index(inside, JOB_LINK)
            .await?
            .ok_or_else(|| NetnsError::NoLink(JOB_LINK.into()))?;
        if let Some(s6) = subnet6 {
            // IPv6 is off in the namespace (all, default): on for eth0, and for lo, which
            // carries the packets to the job's own addresses — among them the refusals its
            // table sends back (without it a refused `connect` would hang).
            let proc_dir = self.cfg.proc_dir.clone();
            run_in_netns(ns_path, move || {
                ipv6_link_knobs(&proc_dir, JOB_LINK)?;
                ipv6_link_knobs(&proc_dir, "lo")
            })??;
            inside
                .address()
                .add(eth0, IpAddr::V6(s6.job_addr()), addr_pool::JOB_PREFIX6)
                .execute()
                .await
                .map_err(netlink(format!("add {} to {JOB_LINK}", s6.job_addr())))?;
        }
        inside
            .address()
            .add(eth0, IpAddr::V4(subnet.job_addr()), addr_pool::JOB_PREFIX)
            .execute()
            .await
            .map_err(netlink(format!("add {} to {JOB_LINK}", subnet.job_addr())))?;
        set_up(inside, eth0, JOB_LINK).await?;
        inside
            .route()
            .add(
                rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(subnet.host_addr())
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!(
                "add the default route via {}",
                subnet.host_addr()
            )))?;
        if let Some(s6) = subnet6 {
            inside
                .route()
                .add(
                    rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                        .gateway(s6.host_addr())
                        .build(),
                )
                .execute()
                .await
                .map_err(netlink(format!(
                    "add the IPv6 default route via {}",
                    s6.host_addr()
                )))?;
        }
        if let NetMode::Egress(rules) = mode {
            let entries = firewall::widest(&rules.static_v4);
            if !entries.is_empty() {
                // Recorded first: the teardown removes them whatever happens below.
                self.state()
                    .exceptions
                    .insert(job.to_string(), entries.clone());
                let link = host_link.clone();
                tokio::task::spawn_blocking(move || {
                    firewall::apply(
                        &firewall::add_exceptions(&link, &entries),
                        "job's exceptions on the host",
                    )
                })
                .await
                .map_err(|_| NetnsError::Thread(ns_path.to_path_buf()))??;
            }
        }
        Ok(host_link)
    }

    /// At agent shutdown: when this manager bound the namespace directory and no namespace
    /// is left in it, take the bind mount away so nothing of the agent stays mounted.
    pub fn release_dir(&self) {
        let dir = &self.cfg.netns_dir;
        let empty = std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none());
        if empty
            && self
                .bound_dir
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            if let Err(e) = nix::mount::umount2(dir, MntFlags::MNT_DETACH) {
                tracing::debug!(dir = %dir.display(), "namespace directory not unmounted: {e}");
            }
        }
    }

    /// Removes the job's veth and namespace file and gives its subnet back. Idempotent: what
    /// is already gone is skipped. The namespace itself dies once nothing holds it: the
    /// job's processes (kill its cgroup first) and the endpoint sockets (close them first).
    pub async fn teardown(&self, job: &str) -> Result<(), NetnsError> {
        check_job(job)?;
        self.remove_objects(job).await?;
        self.state().pool.release(job);
        Ok(())
    }

    async fn remove_objects(&self, job: &str) -> Result<(), NetnsError> {
        if let Ok(ns) = File::open(self.ns_path(job)) {
            self.state().held.insert(job.to_string(), ns);
        }
        let entries = self.state().exceptions.get(job).cloned();
        if let Some(entries) = entries {
            let link = host_link_name(job);
            tokio::task::spawn_blocking(move || {
                firewall::apply(
                    &firewall::delete_exceptions(&link, &entries),
                    "removal of the job's exceptions on the host",
                )
            })
            .await
            .map_err(|_| NetnsError::Thread(self.ns_path(job)))??;
        }
        // Deleting the host end deletes the job's end too, wherever it is.
        self.remove_link_named(&host_link_name(job)).await?;
        remove_namespace_file(&self.ns_path(job))
    }

    async fn remove_link_named(&self, name: &str) -> Result<(), NetnsError> {
        if let Some(index) = link_index(&self.handle, name).await? {
            match self.handle.link().del(index).execute().await {
                Err(e) if netlink_errno(&e) == Some(Errno::ENODEV) => {}
                r => r.map_err(netlink(format!("delete link {name}")))?,
            }
        }
        Ok(())
    }

    /// What of the job's network is still there: its link, its namespace file or mount, and
    /// (if this manager built it) any process still in its namespace. Empty: all gone.
    pub async fn verify_gone(&self, job: &str) -> Result<Vec<Leftover>, NetnsError> {
        check_job(job)?;
        let mut left = Vec::new();
        let link = host_link_name(job);
        if link_index(&self.handle, &link).await?.is_some() {
            left.push(Leftover::Link(link));
        }
        let path = self.ns_path(job);
        if path.symlink_metadata().is_ok() {
            left.push(Leftover::NamespaceFile(path.clone()));
        }
        let mountinfo = self.cfg.proc_dir.join("self/mountinfo");
        let mounts = std::fs::read_to_string(&mountinfo).map_err(|source| NetnsError::Read {
            path: mountinfo,
            source,
        })?;
        if mount_points(&mounts).any(|m| Path::new(&m) == path) {
            left.push(Leftover::NamespaceMount(path));
        }
        let inode = self.state().inodes.get(job).copied();
        if let Some(inode) = inode {
            for pid in processes_in_netns(&self.cfg.proc_dir, inode)? {
                left.push(Leftover::Process(pid));
            }
        }
        // Only a job that had entries in the host's exceptions needs that set read (an `nft`
        // run); a crashed agent's are found by `remove_stale_exceptions` at start.
        let had_exceptions = self.state().exceptions.contains_key(job);
        if had_exceptions {
            let link = host_link_name(job);
            let in_exceptions = tokio::task::spawn_blocking(firewall::list_exceptions)
                .await
                .map_err(|_| NetnsError::Thread(self.ns_path(job)))??
                .iter()
                .filter(|e| e.0 == link)
                .count();
            if in_exceptions > 0 {
                left.push(Leftover::Exceptions(link, in_exceptions));
            }
        }
        let mut state = self.state();
        // Let the namespace go (it dies here when nothing else holds it).
        state.held.remove(job);
        if left.is_empty() {
            state.inodes.remove(job);
            state.exceptions.remove(job);
        }
        Ok(left)
    }

    /// Airlock-owned namespaces (`airlock-*` in the namespace directory) and host links
    /// (`al-*`) that belong to no job of this manager: what a crash left behind.
    pub async fn list_orphans(&self) -> Result<Orphans, NetnsError> {
        let live = |job: &Option<String>| {
            job.as_deref()
                .is_some_and(|j| self.state().inodes.contains_key(j))
        };
        let mut orphans = Orphans::default();
        let dir = &self.cfg.netns_dir;
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|source| NetnsError::Read {
                        path: dir.clone(),
                        source,
                    })?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                        continue;
                    };
                    let job_id = valid_job_id(rest).then(|| rest.to_string());
                    if !live(&job_id) {
                        orphans.namespaces.push(OrphanNamespace { name, job_id });
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(NetnsError::Read {
                    path: dir.clone(),
                    source,
                })
            }
        }
        let _dump = self.dumps.lock().await;
        let mut links = self.handle.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(netlink("list links"))? {
            let mut name = None;
            let mut alias = None;
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::IfAlias(a) => alias = Some(a),
                    _ => {}
                }
            }
            let Some(name) = name.filter(|n| n.starts_with(LINK_PREFIX)) else {
                continue;
            };
            let job_id = alias
                .as_deref()
                .and_then(|a| a.strip_prefix(LINK_ALIAS_PREFIX))
                .filter(|j| valid_job_id(j))
                .map(str::to_string);
            if !live(&job_id) {
                orphans.links.push(OrphanLink { name, job_id });
            }
        }
        Ok(orphans)
    }

    /// Removes the host's exceptions of links that no longer exist (what a crashed agent's
    /// jobs left); entries of live links (this agent's or another's) stay. Returns how many
    /// were removed.
    pub async fn remove_stale_exceptions(&self) -> Result<usize, NetnsError> {
        let entries = tokio::task::spawn_blocking(firewall::list_exceptions)
            .await
            .map_err(|_| NetnsError::Thread(self.cfg.netns_dir.clone()))??;
        let mut removed = 0;
        let mut by_link: HashMap<String, Vec<(Ipv4Addr, u8, u16)>> = HashMap::new();
        for (link, addr, len, port) in entries {
            by_link.entry(link).or_default().push((addr, len, port));
        }
        for (link, entries) in by_link {
            if link_index(&self.handle, &link).await?.is_some() {
                continue;
            }
            removed += entries.len();
            let l = link.clone();
            tokio::task::spawn_blocking(move || {
                firewall::apply(
                    &firewall::delete_exceptions(&l, &entries),
                    "removal of stale exceptions on the host",
                )
            })
            .await
            .map_err(|_| NetnsError::Thread(self.cfg.netns_dir.clone()))??;
            tracing::info!(
                link,
                "removed a crashed job's exceptions from the host's table"
            );
        }
        Ok(removed)
    }

    /// Removes an orphaned `al-*` link (one whose job is unknown; with a job id, use
    /// [`NetManager::teardown`]).
    pub async fn remove_orphan_link(&self, name: &str) -> Result<(), NetnsError> {
        if !name.starts_with(LINK_PREFIX) {
            return Err(NetnsError::NotOurs(name.to_string()));
        }
        self.remove_link_named(name).await
    }

    /// Removes an orphaned `airlock-*` namespace file.
    pub fn remove_orphan_namespace(&self, name: &str) -> Result<(), NetnsError> {
        if !name.starts_with(NETNS_PREFIX) || name.contains('/') || name.contains("..") {
            return Err(NetnsError::NotOurs(name.to_string()));
        }
        remove_namespace_file(&self.cfg.netns_dir.join(name))
    }
}

/// Binds TCP listeners on `addrs` inside the network namespace at `ns_path`, from a
/// dedicated thread that enters it and exits. The sockets stay in that namespace wherever
/// they are used: serve them with `tokio::net::TcpListener::from_std` from the host
/// namespace. They are non-blocking. Blocks briefly (one thread spawn and join).
pub fn bind_in_netns(ns_path: &Path, addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, NetnsError> {
    let path = ns_path.to_path_buf();
    let addrs = addrs.to_vec();
    run_in_netns(ns_path, move || {
        addrs
            .iter()
            .map(|&addr| {
                let bind_err = |source| NetnsError::Bind {
                    addr,
                    path: path.clone(),
                    source,
                };
                let listener = TcpListener::bind(addr).map_err(bind_err)?;
                listener.set_nonblocking(true).map_err(bind_err)?;
                Ok(listener)
            })
            .collect::<Result<Vec<_>, NetnsError>>()
    })?
}

/// Runs `f` on a dedicated thread that has entered the network namespace at `ns_path`
/// (sockets `f` makes stay in that namespace), and returns what it returns.
pub fn run_in_netns<T, F>(ns_path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = ns_path.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("airlock-netns-run".into())
        .spawn(move || {
            let ns = File::open(&path).map_err(|source| NetnsError::Open {
                path: path.clone(),
                source,
            })?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetnsError::Enter {
                    path: path.clone(),
                    source,
                }
            })?;
            Ok(f())
        })
        .map_err(|_| NetnsError::Thread(ns_path.to_path_buf()))?;
    thread
        .join()
        .map_err(|_| NetnsError::Thread(ns_path.to_path_buf()))?
}

/// Runs on a fresh thread: makes the namespace, pins it on `path`, and opens a netlink socket
/// inside it. The thread exits afterwards; the bind mount and the socket keep the namespace.
fn new_namespace(path: &Path, rt: &tokio::runtime::Handle) -> Result<NewNamespace, NetnsError> {
    // Like iproute2: an empty file, mode 0, that the namespace is bind-mounted on.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(NetnsError::Exists(path.to_path_buf()))
        }
        Err(source) => {
            return Err(NetnsError::NamespaceFile {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    let pinned = (|| {
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(NetnsError::Unshare)?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        nix::mount::mount(
            Some(own.as_str()),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|source| NetnsError::Mount {
            path: path.to_path_buf(),
            source,
        })
    })();
    if let Err(e) = pinned {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // From here the caller's cleanup removes the namespace on any failure.
    let inode = std::fs::metadata(path)
        .map_err(|source| NetnsError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .ino();
    // No IPv6 in the job's network: IPv4 is all the endpoint needs, and IPv6 link-local
    // addresses on the veth would give the job a path the IPv4 rules do not cover.
    // (/proc/sys/net shows the namespace of the thread that opens it.)
    for knob in ["all", "default"] {
        let p = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6"));
        match std::fs::write(&p, "1") {
            Ok(()) => {}
            // A kernel without IPv6 has nothing to disable.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(NetnsError::Sysctl { path: p, source }),
        }
    }
    let _rt = rt.enter();
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetnsError::NetlinkSocket)?;
    Ok(NewNamespace {
        inode,
        conn,
        handle,
    })
}

/// IPv6 on for `link` (in the namespace of the calling thread), without duplicate address
/// detection or router advertisements.
fn ipv6_link_knobs(proc_dir: &Path, link: &str) -> Result<(), NetnsError> {
    for (knob, value) in [
        ("accept_dad", "0"),
        ("accept_ra", "0"),
        ("disable_ipv6", "0"),
    ] {
        let path = proc_dir.join(format!("sys/net/ipv6/conf/{link}/{knob}"));
        std::fs::write(&path, value).map_err(|source| NetnsError::Sysctl { path, source })?;
    }
    Ok(())
}

/// Whether `dir` is a mount point on which the directory itself is bound (as
/// [`ensure_netns_dir`] and iproute2 leave it).
fn dir_is_self_bind(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let is_mount_point = mount_points(&mounts).any(|m| Path::new(&m) == dir);
    is_mount_point && super::jobfs::bound_onto_itself(dir)
}

/// Makes `dir` exist and be a shared mount point, as iproute2 does, so that namespace
/// mounts made in it propagate to mount namespaces cloned later.
/// Makes `dir` a shared mount point like iproute2 does; `true` when it had to bind it onto
/// itself first.
fn ensure_netns_dir(dir: &Path) -> Result<bool, NetnsError> {
    let err = |source| NetnsError::NetnsDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|source| NetnsError::NamespaceFile {
        path: dir.to_path_buf(),
        source,
    })?;
    let shared = || {
        nix::mount::mount(
            None::<&str>,
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        // Already a mount point: ours when it is the directory bound onto itself (as a
        // restarted agent finds the bind its predecessor made), so it is released at
        // shutdown all the same.
        Ok(()) => Ok(super::jobfs::bound_onto_itself(dir)),
        // Not a mount point yet: bind it onto itself, then make it shared.
        Err(Errno::EINVAL) => {
            nix::mount::mount(
                Some(dir),
                dir,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(err)?;
            shared().map_err(err)?;
            Ok(true)
        }
        Err(e) => Err(err(e)),
    }
}

fn remove_namespace_file(path: &Path) -> Result<(), NetnsError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (already unmounted); ENOENT: no file.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(source) => {
            return Err(NetnsError::Unmount {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn netlink_errno(e: &rtnetlink::Error) -> Option<Errno> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| Errno::from_raw(-c.get())),
        _ => None,
    }
}

/// Index of the link called `name`, or `None` if there is none.
async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<Option<u32>, NetnsError> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(e) if netlink_errno(&e) == Some(Errno::ENODEV) => Ok(None),
        Err(e) => Err(netlink(format!("look up link {name}"))(e)),
    }
}

async fn set_up(handle: &rtnetlink::Handle, index: u32, name: &str) -> Result<(), NetnsError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(netlink(format!("set {name} up")))
}

/// Mount points in a mountinfo text (field 5, with `\040`-style escapes undone).
fn mount_points(mountinfo: &str) -> impl Iterator<Item = String> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_octal)
}

fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids whose network namespace has inode `inode`.
fn processes_in_netns(proc_dir: &Path, inode: u64) -> Result<Vec<i32>, NetnsError> {
    let want = format!("net:[{inode}]");
    let entries = std::fs::read_dir(proc_dir).map_err(|source| NetnsError::Read {
        path: proc_dir.to_path_buf(),
        source,
    })?;
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A process may exit while we look: that is not a leftover.
        if let Ok(target) = std::fs::read_link(entry.path().join("ns/net")) {
            if target.as_os_str() == want.as_str() {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_and_iproute2() {
        let job = "j-0123456789abcdef";
        assert_eq!(netns_name(job), "airlock-j-0123456789abcdef");
        let link = host_link_name(job);
        assert!(link.len() <= 15, "{link}: IFNAMSIZ is 16 with the NUL");
        assert!(link.starts_with("al-") && link.ends_with('h'), "{link}");
        assert_eq!(
            link,
            host_link_name(job),
            "deterministic, for crash recovery"
        );
        assert_ne!(link, host_link_name("j-0123456789abcdee"));
        assert!(matches!(
            check_job("../etc"),
            Err(NetnsError::InvalidJobId(_))
        ));
        assert!(check_job(job).is_ok());
    }

    #[test]
    fn mountinfo_mount_points_are_unescaped() {
        let text = "42 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    99 42 0:4 net:[4026532] /run/netns/airlock-j-1 rw shared:1 - nsfs nsfs rw\n\
                    100 42 0:4 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        let points: Vec<String> = mount_points(text).collect();
        assert_eq!(
            points,
            ["/run/netns", "/run/netns/airlock-j-1", "/mnt/with space"]
        );
    }

    #[test]
    fn endpoint_addresses_are_the_ones_the_sdks_use() {
        assert_eq!(CONTAINER_ENDPOINT.to_string(), "169.254.170.2:80");
        assert_eq!(IMDS_ENDPOINT.to_string(), "169.254.169.254:80");
        assert_eq!(NetMode::EndpointOnly.to_string(), "endpoint-only");
        assert_eq!(NetMode::Outbound.to_string(), "outbound");
    }
}
