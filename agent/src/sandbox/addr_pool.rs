//! The pool of per-job IPv4 subnets: one /30 per job out of a configured range
//! (`10.200.0.0/16` by default, 16,384 jobs).
//!
//! In a /30 the host end of the job's veth takes `.1` and the job's `eth0` takes `.2`. Subnets
//! are handed out next-fit, so a subnet a job just gave back is the last one to be reused: a
//! late packet or a stale record never meets the next job on the same address (kube2iam
//! handed one pod another pod's role through address reuse). This module owns bookkeeping
//! only; it never touches the kernel.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Prefix length of every job's subnet.
pub const JOB_PREFIX: u8 = 30;
/// The pool used when the config names none.
pub const DEFAULT_POOL: &str = "10.200.0.0/16";

/// Errors of the address pool.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("address pool {0:?} is not of the form A.B.C.D/N; write e.g. \"10.200.0.0/16\"")]
    Syntax(String),
    #[error(
        "address pool {0}: the prefix length must be between 8 and {JOB_PREFIX} (one /{JOB_PREFIX} per job)"
    )]
    PrefixLength(Cidr),
    #[error("address pool {0}: host bits are set; did you mean {1}?")]
    NotAligned(Cidr, Cidr),
    #[error(
        "address pool {0} overlaps {1}, which jobs must never own; choose a private range such as 10.200.0.0/16"
    )]
    Reserved(Cidr, &'static str),
    #[error("address pool {0} is exhausted ({1} jobs hold a subnet); end jobs or configure a larger pool")]
    Exhausted(Cidr, usize),
    #[error("job {0} already holds subnet {1}")]
    AlreadyAllocated(String, Cidr),
    #[error("subnet {0} is not a /{JOB_PREFIX} inside pool {1}")]
    OutsidePool(Cidr, Cidr),
    #[error("subnet {0} is already held by job {1}")]
    InUse(Cidr, String),
}

/// An IPv4 network: address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        }
    }

    /// The first and last address of the network.
    pub fn range(&self) -> (u32, u32) {
        let start = u32::from(self.addr) & Self::mask(self.prefix);
        (start, start | !Self::mask(self.prefix))
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let (a0, a1) = self.range();
        let (b0, b1) = other.range();
        a0 <= b1 && b0 <= a1
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Cidr, PoolError> {
        let syntax = || PoolError::Syntax(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if prefix > 32 {
            return Err(syntax());
        }
        Ok(Cidr { addr, prefix })
    }
}

/// Ranges a job's subnet must never overlap: the job would shadow or reach them.
const RESERVED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (0.0.0.0/8)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    (
        "169.254.0.0/16",
        "link-local and the metadata addresses (169.254.0.0/16)",
    ),
    ("224.0.0.0/3", "multicast and reserved space (224.0.0.0/3)"),
];

/// One job's /30.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
}

impl Subnet {
    /// The subnet starting at `network` (must be /30-aligned: checked by the pool).
    fn at(network: u32) -> Subnet {
        Subnet {
            network: Ipv4Addr::from(network),
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The address of the host end of the veth (`.1`).
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The address of the job's `eth0` (`.2`).
    pub fn job_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 2)
    }

    pub fn cidr(&self) -> Cidr {
        Cidr {
            addr: self.network,
            prefix: JOB_PREFIX,
        }
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.cidr().fmt(f)
    }
}

/// Hands out one /30 per job and takes it back.
#[derive(Debug)]
pub struct AddressPool {
    pool: Cidr,
    /// Number of /30s in the pool.
    slots: u32,
    /// Next-fit cursor: the slot to try first.
    cursor: u32,
    /// Job id → slot, and the reverse.
    by_job: HashMap<String, u32>,
    by_slot: HashMap<u32, String>,
}

impl AddressPool {
    /// A pool over `pool`, which must be aligned, between /8 and /30, and clear of loopback,
    /// link-local (the metadata addresses) and multicast.
    pub fn new(pool: Cidr) -> Result<AddressPool, PoolError> {
        if !(8..=JOB_PREFIX).contains(&pool.prefix) {
            return Err(PoolError::PrefixLength(pool));
        }
        let (start, _) = pool.range();
        if start != u32::from(pool.addr) {
            let aligned = Cidr {
                addr: Ipv4Addr::from(start),
                prefix: pool.prefix,
            };
            return Err(PoolError::NotAligned(pool, aligned));
        }
        for (range, what) in RESERVED {
            let reserved: Cidr = range.parse()?;
            if pool.overlaps(&reserved) {
                return Err(PoolError::Reserved(pool, what));
            }
        }
        Ok(AddressPool {
            pool,
            slots: 1 << (JOB_PREFIX - pool.prefix),
            cursor: 0,
            by_job: HashMap::new(),
            by_slot: HashMap::new(),
        })
    }

    /// The pool's range.
    pub fn range(&self) -> Cidr {
        self.pool
    }

    /// How many subnets are free.
    pub fn available(&self) -> usize {
        self.slots as usize - self.by_slot.len()
    }

    /// The subnet `job` holds, if any.
    pub fn get(&self, job: &str) -> Option<Subnet> {
        self.by_job.get(job).map(|&slot| self.subnet(slot))
    }

    fn subnet(&self, slot: u32) -> Subnet {
        Subnet::at(u32::from(self.pool.addr) + (slot << (32 - JOB_PREFIX)))
    }

    /// A free subnet for `job` (a job holds at most one).
    pub fn allocate(&mut self, job: &str) -> Result<Subnet, PoolError> {
        if let Some(held) = self.get(job) {
            return Err(PoolError::AlreadyAllocated(job.to_string(), held.cidr()));
        }
        for i in 0..self.slots {
            let slot = (self.cursor + i) % self.slots;
            if !self.by_slot.contains_key(&slot) {
                self.cursor = (slot + 1) % self.slots;
                self.by_slot.insert(slot, job.to_string());
                self.by_job.insert(job.to_string(), slot);
                return Ok(self.subnet(slot));
            }
        }
        Err(PoolError::Exhausted(self.pool, self.by_slot.len()))
    }

    /// Marks `subnet` as held by `job` (crash recovery: a job whose network survived).
    pub fn reserve(&mut self, job: &str, subnet: Subnet) -> Result<(), PoolError> {
        let offset = u32::from(subnet.network).wrapping_sub(u32::from(self.pool.addr));
        let aligned = offset % (1 << (32 - JOB_PREFIX)) == 0;
        let slot = offset >> (32 - JOB_PREFIX);
        if !self.pool.overlaps(&subnet.cidr()) || !aligned || slot >= self.slots {
            return Err(PoolError::OutsidePool(subnet.cidr(), self.pool));
        }
        if let Some(holder) = self.by_slot.get(&slot) {
            return Err(PoolError::InUse(subnet.cidr(), holder.clone()));
        }
        if let Some(held) = self.get(job) {
            return Err(PoolError::AlreadyAllocated(job.to_string(), held.cidr()));
        }
        self.by_slot.insert(slot, job.to_string());
        self.by_job.insert(job.to_string(), slot);
        Ok(())
    }

    /// Gives back the subnet `job` held, if any.
    pub fn release(&mut self, job: &str) -> Option<Subnet> {
        let slot = self.by_job.remove(job)?;
        self.by_slot.remove(&slot);
        Some(self.subnet(slot))
    }
}

/// Prefix length of every job's IPv6 subnet: the same four addresses as its IPv4 /30.
pub const JOB_PREFIX6: u8 = 126;

/// The range IPv6 job addresses come from (`[sandbox] ipv6_address_pool`): a unique local
/// (fc00::/7) network of /96 or wider. A job's IPv6 addresses are the prefix followed by its
/// IPv4 /30 (`<prefix>::10.200.0.1` on the host end, `::10.200.0.2` in the job), so they are
/// as unique as the IPv4 ones and need no bookkeeping of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool6 {
    pub addr: Ipv6Addr,
    pub prefix: u8,
}

impl Pool6 {
    fn mask(prefix: u8) -> u128 {
        if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(prefix))
        }
    }

    /// The job's IPv6 /126 beside its IPv4 /30.
    pub fn subnet(&self, v4: &Subnet) -> Subnet6 {
        Subnet6 {
            network: Ipv6Addr::from(u128::from(self.addr) | u128::from(u32::from(v4.network))),
        }
    }

    /// Whether `addr/prefix` (a network of the host) shares an address with the pool.
    pub fn overlaps(&self, addr: Ipv6Addr, prefix: u8) -> bool {
        let shorter = self.prefix.min(prefix);
        let m = Self::mask(shorter);
        u128::from(self.addr) & m == u128::from(addr) & m
    }
}

impl fmt::Display for Pool6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Pool6 {
    type Err = String;

    fn from_str(s: &str) -> Result<Pool6, String> {
        let syntax =
            || format!("{s:?} is not of the form ADDR/N; write e.g. \"fd61:6972:6c6b::/96\"");
        let (addr, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !(8..=96).contains(&prefix) {
            return Err(format!(
                "{s}: the prefix length must be between 8 and 96 (the last 32 bits are the job's IPv4 address)"
            ));
        }
        let net = Ipv6Addr::from(u128::from(addr) & Self::mask(prefix));
        if net != addr {
            return Err(format!(
                "{s}: host bits are set; did you mean {net}/{prefix}?"
            ));
        }
        if addr.segments()[0] & 0xfe00 != 0xfc00 {
            return Err(format!(
                "{s} is not a unique local network (fc00::/7): jobs' addresses are masqueraded and must never be \
                 routable; choose one such as fd61:6972:6c6b::/96"
            ));
        }
        let pool = Pool6 { addr, prefix };
        if pool.overlaps(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0), 32) {
            return Err(format!(
                "{s} overlaps fd00:ec2::/32, where EC2's IPv6 metadata and DNS addresses are"
            ));
        }
        Ok(pool)
    }
}

/// One job's IPv6 /126.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet6 {
    network: Ipv6Addr,
}

impl Subnet6 {
    /// The host end of the veth (`::1` of the /126).
    pub fn host_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) + 1)
    }

    /// The job's `eth0` (`::2` of the /126).
    pub fn job_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.network) + 2)
    }
}

impl fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{JOB_PREFIX6}", self.network)
    }
}

/// `Subnet` from its network address, for [`AddressPool::reserve`].
impl From<Ipv4Addr> for Subnet {
    fn from(network: Ipv4Addr) -> Subnet {
        Subnet { network }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(s: &str) -> AddressPool {
        AddressPool::new(s.parse().unwrap()).unwrap()
    }

    #[test]
    fn ipv6_subnets_follow_the_ipv4_ones() {
        let p6: Pool6 = "fd61:6972:6c6b::/96".parse().unwrap();
        let mut p = pool("10.200.0.0/16");
        p.allocate("a").unwrap();
        let b = p.allocate("b").unwrap();
        let b6 = p6.subnet(&b);
        assert_eq!(b6.to_string(), "fd61:6972:6c6b::ac8:4/126");
        assert_eq!(
            b6.host_addr(),
            "fd61:6972:6c6b::ac8:5".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            b6.job_addr(),
            "fd61:6972:6c6b::ac8:6".parse::<Ipv6Addr>().unwrap()
        );
        assert!(p6.overlaps("fd61:6972:6c6b::".parse().unwrap(), 64));
        assert!(p6.overlaps("fd61:6972:6c6b::ac8:0".parse().unwrap(), 120));
        assert!(!p6.overlaps("fd00::".parse().unwrap(), 64));
    }

    #[test]
    fn bad_ipv6_pools_are_refused_with_a_hint() {
        for (pool, want) in [
            ("fd61::", "form ADDR/N"),
            ("fd61::/120", "between 8 and 96"),
            ("fd61::1/96", "did you mean fd61::/96"),
            ("2001:db8::/96", "unique local"),
            ("fd00:ec2::/64", "metadata"),
            ("fd00::/16", "metadata"),
        ] {
            let e = pool.parse::<Pool6>().unwrap_err();
            assert!(e.contains(want), "{pool}: {e}");
        }
    }

    #[test]
    fn subnets_are_slash_30s_with_host_and_job_ends() {
        let mut p = pool("10.200.0.0/16");
        assert_eq!(p.available(), 16_384);
        let a = p.allocate("a").unwrap();
        let b = p.allocate("b").unwrap();
        assert_eq!(a.to_string(), "10.200.0.0/30");
        assert_eq!(a.host_addr(), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a.job_addr(), Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(b.to_string(), "10.200.0.4/30");
        assert_eq!(p.get("a"), Some(a));
        assert_eq!(p.available(), 16_382);
        assert!(matches!(
            p.allocate("a"),
            Err(PoolError::AlreadyAllocated(..))
        ));
    }

    #[test]
    fn released_subnets_are_reused_last_and_exhaustion_is_an_error() {
        let mut p = pool("10.200.7.0/28"); // four /30s
        let first = p.allocate("j1").unwrap();
        for j in ["j2", "j3", "j4"] {
            p.allocate(j).unwrap();
        }
        let err = p.allocate("j5").unwrap_err();
        assert_eq!(
            err,
            PoolError::Exhausted("10.200.7.0/28".parse().unwrap(), 4)
        );
        assert!(err.to_string().contains("larger pool"), "{err}");
        assert_eq!(p.release("j1"), Some(first));
        assert_eq!(p.release("j1"), None);
        // The only free subnet is j1's old one, so it comes back, but only then.
        assert_eq!(p.allocate("j5").unwrap(), first);
        p.release("j2");
        p.release("j3");
        let next = p.allocate("j6").unwrap();
        assert_eq!(
            next.to_string(),
            "10.200.7.4/30",
            "next-fit after j5's slot"
        );
        let next = p.allocate("j7").unwrap();
        assert_eq!(next.to_string(), "10.200.7.8/30");
    }

    #[test]
    fn reserve_takes_a_recorded_subnet_and_refuses_conflicts() {
        let mut p = pool("10.200.0.0/24");
        let s = Subnet::from(Ipv4Addr::new(10, 200, 0, 8));
        p.reserve("old", s).unwrap();
        assert_eq!(p.get("old"), Some(s));
        assert!(matches!(p.reserve("other", s), Err(PoolError::InUse(..))));
        for bad in [
            Ipv4Addr::new(10, 200, 0, 9),
            Ipv4Addr::new(10, 200, 1, 0),
            Ipv4Addr::new(10, 199, 255, 252),
        ] {
            assert!(
                matches!(p.reserve("x", bad.into()), Err(PoolError::OutsidePool(..))),
                "{bad}"
            );
        }
        // Allocation skips the reserved subnet.
        let got: Vec<String> = (0..3)
            .map(|i| p.allocate(&format!("n{i}")).unwrap().to_string())
            .collect();
        assert_eq!(got, ["10.200.0.0/30", "10.200.0.4/30", "10.200.0.12/30"]);
    }

    #[test]
    fn bad_pools_are_refused_with_a_hint() {
        let err = |s: &str| AddressPool::new(s.parse().unwrap()).unwrap_err();
        assert!(matches!(err("10.200.0.0/31"), PoolError::PrefixLength(_)));
        assert!(matches!(err("10.0.0.0/7"), PoolError::PrefixLength(_)));
        let e = err("10.200.1.0/16");
        assert!(e.to_string().contains("did you mean 10.200.0.0/16"), "{e}");
        for reserved in [
            "169.254.0.0/16",
            "127.0.0.0/8",
            "224.0.0.0/8",
            "169.0.0.0/8",
        ] {
            assert!(
                matches!(err(reserved), PoolError::Reserved(..)),
                "{reserved}"
            );
        }
        for syntax in ["10.200.0.0", "10.200.0.0/33", "ten/16", "10.200.0/16"] {
            assert!(
                matches!(syntax.parse::<Cidr>(), Err(PoolError::Syntax(_))),
                "{syntax}"
            );
        }
        assert!(DEFAULT_POOL.parse::<Cidr>().is_ok());
    }
}
