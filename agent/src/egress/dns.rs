//! The job's DNS resolver. An egress-controlled job's only resolver is the agent, on
//! [`RESOLVER_ADDR`] inside the job's network namespace, over UDP and TCP. The caller binds
//! both sockets in the namespace (as `bind_in_netns` does for the endpoint) and hands them to
//! [`serve`], which serves them from the host namespace.
//!
//! For every query:
//! - the queried name, lowercased and without its trailing dot, goes to the job's policy
//!   ([`AllowFn`]). A name the policy does not allow is answered REFUSED and nothing leaves
//!   the host: the name is never forwarded, so it cannot carry data out. Names that are not
//!   host names (bytes other than letters, digits, `-` and `_`) are refused the same way.
//! - For an allowed name, A, AAAA and CNAME queries are forwarded from the host namespace
//!   (ordinary sockets of the agent) to the upstream resolvers, in order, each with
//!   [`DnsConfig::timeout`]; a truncated UDP answer is asked again over TCP. The job gets the
//!   CNAME chain from its name and the addresses at the chain's end — nothing else of the
//!   upstream's answer — and only after [`AdmitFn`] has put every one of those addresses into
//!   the job's firewall sets, so the job can never connect before its address is allowed. If
//!   admission fails, the job gets SERVFAIL.
//! - Every other type for an allowed name is answered here without asking anyone: ANY with
//!   the HINFO "RFC8482" record RFC 8482 describes, the rest with NOERROR and no records
//!   (NODATA). TXT never leaves, and HTTPS/SVCB never bring in address hints the firewall has
//!   not seen.
//!
//! Queries that cannot be read get FORMERR when their header can (nothing otherwise), as do
//! queries with more than one question; opcodes other than QUERY get NOTIMP, EDNS versions
//! other than 0 BADVERS, classes other than IN REFUSED; messages that are responses get
//! nothing. A UDP reply larger than the job's stated size goes out truncated (TC) before
//! anything is admitted, and the job asks again over TCP. The job-facing TCP listener takes
//! several length-prefixed queries per connection, answered in order, and closes a connection
//! idle for [`DnsConfig::tcp_idle_timeout`]. At most [`DnsConfig::max_in_flight`] queries of a
//! job are in progress at once, [`MAX_TCP_CONNECTIONS`] connections open, and
//! [`DnsConfig::query_rate`] queries read a second: a flood fills the job's own socket
//! queues, not the agent. Each job has its own answer cache (bounded in entries and bytes,
//! for as long as the TTLs say); a cache miss goes upstream only within
//! [`DnsConfig::upstream_rate`], beyond which the job gets SERVFAIL and nothing is
//! forwarded. A cached answer is admitted again like a fresh one before it is released.
//!
//! CNAME targets are not checked against the policy: an allowed name may be an alias of a
//! CDN's name (`www.example.com` → `example.com.cdn.example.net`), and what is admitted are
//! the addresses the *allowed* name resolves to. The other way round does not hold: a name
//! the policy does not allow is refused even if it is an alias of an allowed one, because
//! asking about it would already send it out. Known limits: an address shared by many sites
//! (a CDN) is admitted for all of them; and a job can still encode data in names under a
//! wildcard it is allowed (`*.example.com`), readable by whoever runs that zone's servers.
//!
//! This module never touches the firewall or the audit log: addresses are admitted through
//! the caller's hook, and each query becomes a [`DnsEvent`] on a channel the resolver never
//! waits on (an event is dropped when the channel is full).

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::HINFO;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

/// Where a job's resolver listens, inside the job's namespace (UDP and TCP). Link-local, like
/// the endpoint's addresses, so it is on the job's `lo` and nowhere else.
pub const RESOLVER_ADDR: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(169, 254, 170, 53), 53));
/// How long one upstream has to answer before the next one is asked.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries of one job in progress at once (over UDP and TCP together). Beyond it the agent
/// stops reading the job's sockets: the kernel queues or drops what the job sends, and the
/// job's stub resolver asks again, as with any overloaded server.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// A TCP connection of the job is closed after this long without a query (RFC 7766 asks for
/// seconds, not minutes).
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections of one job open at once; further connections wait in the listen backlog.
pub const MAX_TCP_CONNECTIONS: usize = 16;
/// Queries of one job the agent reads per second, and the burst above that rate
/// ([`DnsConfig::query_rate`]). Beyond them the agent stops reading the job's sockets, as at
/// [`DEFAULT_MAX_IN_FLIGHT`]: a flood fills the job's own socket queues, not the agent's CPU.
pub const DEFAULT_QUERY_RATE: Rate = Rate {
    per_second: 500,
    burst: 1000,
};
/// Queries of one job forwarded upstream per second, and the burst above that rate
/// ([`DnsConfig::upstream_rate`]); cached answers, refused names and the types answered here
/// do not count. Beyond them the job gets SERVFAIL at once and nothing leaves the host.
pub const DEFAULT_UPSTREAM_RATE: Rate = Rate {
    per_second: 50,
    burst: 100,
};
/// Answers kept in one job's cache, and their size in bytes (records as the agent holds
/// them), at most ([`DnsConfig::cache_entries`], [`DnsConfig::cache_bytes`]).
pub const DEFAULT_CACHE_ENTRIES: usize = 512;
pub const DEFAULT_CACHE_BYTES: usize = 128 * 1024;
/// The longest a negative answer (NXDOMAIN or no records) is cached: its SOA's TTL and
/// minimum, at most this (RFC 2308 suggests one to three hours; a CI job wants to see a
/// name appear sooner).
pub const MAX_NEGATIVE_TTL_SECS: u32 = 300;
/// glibc reads at most three `nameserver` lines, and so does [`DnsConfig::from_resolv_conf`].
pub const MAX_RESOLV_CONF_NAMESERVERS: usize = 3;
/// The shortest time an admitted address stays in the job's set, whatever its TTL. Many
/// clients keep an address longer than a short TTL says (curl and browsers 60 s, the JVM
/// 30 s); the floor is twice the longest of these, so a job's cached address is still allowed
/// when it connects again. The job itself is told the upstream's TTL, not the floor.
pub const MIN_TTL_SECS: u32 = 120;
/// The longest TTL the job is told, and so (plus [`TTL_GRACE_SECS`]) the longest an address
/// stays in the job's set without being resolved again: an address a name left is not allowed
/// for a day because its record said so, and asking again once an hour costs nothing.
pub const MAX_TTL_SECS: u32 = 3600;
/// An address is admitted a little longer than the TTL the job is told: the set's clock starts
/// before the reply leaves, the job's cache clock after it arrives.
pub const TTL_GRACE_SECS: u32 = 5;
/// The TTL of the HINFO record that answers ANY (RFC 8482 leaves it to the implementer).
const ANY_TTL_SECS: u32 = 3600;
/// What the agent announces (EDNS) to upstream resolvers: 1232 bytes avoids IP fragmentation
/// on every path (DNS flag day 2020); larger answers come over TCP.
const UPSTREAM_UDP_PAYLOAD: u16 = 1232;
/// The largest UDP reply the job gets (when it announces as much): the job's link to the
/// resolver is its loopback, where nothing fragments.
const JOB_UDP_PAYLOAD: u16 = 4096;
/// A UDP datagram larger than this from the job or an upstream is cut, then fails to parse.
const UDP_BUFFER: usize = 4096;
/// Longest CNAME chain followed; longer chains (or loops) end without addresses.
const MAX_CNAME_CHAIN: usize = 16;
/// How long admission may take before the job gets SERVFAIL.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `recv`/`accept`, so a persistent error cannot spin a worker.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Errors of the job's resolver.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("no upstream resolver: no `nameserver <IP address>` line in the resolv.conf text; name the resolvers in the configuration")]
    NoUpstreams,
    #[error("invalid resolver configuration: {0}")]
    Config(String),
    #[error("the job's resolver must be started inside a tokio runtime")]
    NoRuntime,
    #[error("cannot serve the job's resolver {what} socket: {source}")]
    Socket {
        what: &'static str,
        source: io::Error,
    },
    #[error("lookup of {name} at {server} failed: {reason}")]
    Lookup {
        name: String,
        server: SocketAddr,
        reason: String,
    },
}

/// Where and how the resolver asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Asked in this order; the next one when one fails or says SERVFAIL/REFUSED.
    pub upstreams: Vec<SocketAddr>,
    /// Per upstream and transport (a UDP try, then the TCP retry of a truncated answer).
    pub timeout: Duration,
    /// Queries of the job in progress at once.
    pub max_in_flight: usize,
    /// Idle time after which a job's TCP connection is closed.
    pub tcp_idle_timeout: Duration,
    /// The shortest time an admitted pair stays in the job's set ([`MIN_TTL_SECS`] by
    /// default; `[egress] min_admission_ttl`), in seconds, 1 to [`MAX_TTL_SECS`].
    pub min_admit_ttl: u32,
    /// The job's queries read per second ([`DEFAULT_QUERY_RATE`]).
    pub query_rate: Rate,
    /// The job's queries forwarded upstream per second ([`DEFAULT_UPSTREAM_RATE`]).
    pub upstream_rate: Rate,
    /// Answers cached for the job (0: no cache) and their bytes at most.
    pub cache_entries: usize,
    pub cache_bytes: usize,
}

/// A token bucket's rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl DnsConfig {
    /// These upstreams with the default timeouts and limits.
    pub fn new(upstreams: Vec<SocketAddr>) -> DnsConfig {
        DnsConfig {
            upstreams,
            timeout: DEFAULT_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            min_admit_ttl: MIN_TTL_SECS,
            query_rate: DEFAULT_QUERY_RATE,
            upstream_rate: DEFAULT_UPSTREAM_RATE,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }

    /// How long an address answered with this TTL stays in the job's set: the TTL the job
    /// is told (at most [`MAX_TTL_SECS`]) plus [`TTL_GRACE_SECS`], never less than
    /// [`DnsConfig::min_admit_ttl`].
    pub fn admit_ttl(&self, ttl: u32) -> u32 {
        (ttl.min(MAX_TTL_SECS) + TTL_GRACE_SECS).max(self.min_admit_ttl)
    }

    /// The `nameserver` lines of a resolv.conf text (the host's `/etc/resolv.conf` by
    /// default), port 53, at most the first [`MAX_RESOLV_CONF_NAMESERVERS`] as glibc does.
    /// Lines that are not `nameserver <IP address>` are ignored, so are addresses with a
    /// zone (`fe80::1%eth0`), and resolv.conf's own `options` (timeouts, attempts): the
    /// agent uses its own. A loopback resolver (systemd-resolved's `127.0.0.53`) works: the
    /// agent asks from the host's namespace.
    pub fn from_resolv_conf(text: &str) -> Result<DnsConfig, DnsError> {
        let mut upstreams: Vec<SocketAddr> = Vec::new();
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            if words.next() != Some("nameserver") {
                continue;
            }
            let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
                continue;
            };
            let addr = SocketAddr::new(ip, 53);
            if !upstreams.contains(&addr) && upstreams.len() < MAX_RESOLV_CONF_NAMESERVERS {
                upstreams.push(addr);
            }
        }
        if upstreams.is_empty() {
            return Err(DnsError::NoUpstreams);
        }
        Ok(DnsConfig::new(upstreams))
    }

    pub(crate) fn check(&self) -> Result<(), DnsError> {
        if self.upstreams.is_empty() {
            return Err(DnsError::NoUpstreams);
        }
        if self.timeout.is_zero() || self.tcp_idle_timeout.is_zero() {
            return Err(DnsError::Config("timeouts must be longer than zero".into()));
        }
        if self.max_in_flight == 0 {
            return Err(DnsError::Config("max_in_flight must be at least 1".into()));
        }
        if !(1..=MAX_TTL_SECS).contains(&self.min_admit_ttl) {
            return Err(DnsError::Config(format!(
                "the minimum admission TTL must be 1 to {MAX_TTL_SECS} seconds"
            )));
        }
        for (what, rate) in [("query", self.query_rate), ("upstream", self.upstream_rate)] {
            if rate.per_second == 0 || rate.burst == 0 {
                return Err(DnsError::Config(format!(
                    "the {what} rate and its burst must be at least 1"
                )));
            }
        }
        Ok(())
    }
}

/// The addresses an allowed name resolved to, handed to [`AdmitFn`] before the job sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The queried name, lowercased, without the trailing dot (not the CNAME target).
    pub name: String,
    /// Each address (the A or AAAA records at the end of the CNAME chain, without
    /// duplicates) with how long, in seconds, it should stay in the job's set: its TTL as
    /// told to the job plus [`TTL_GRACE_SECS`], at least [`MIN_TTL_SECS`] (see
    /// [`admit_ttl`]). Use it as the set element's timeout as it is.
    pub addrs: Vec<(IpAddr, u32)>,
}

/// The job's policy: is this queried name (lowercase, no trailing dot) allowed?
pub type AllowFn = Arc<dyn Fn(&str) -> bool + Send + Sync>;
/// What [`AdmitFn`] returns.
pub type AdmitFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
/// Puts an answer's addresses into the job's firewall sets; the reply waits for `Ok`.
pub type AdmitFn = Arc<dyn Fn(Answer) -> AdmitFuture + Send + Sync>;

/// What happened to one query of the job, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsEvent {
    /// The queried name, lowercased, without the trailing dot; empty when the query could not
    /// be read.
    pub name: String,
    /// `A`, `AAAA`, `TXT`, … (`TYPE<n>` for types without a name); empty when unreadable.
    pub qtype: String,
    pub verdict: Verdict,
    /// The addresses released to the job (and admitted before).
    pub answers: Vec<IpAddr>,
    /// The smallest TTL of the records released to the job, as the job was told it.
    pub ttl: Option<u32>,
}

/// The resolver's decision on a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Allowed by the policy and answered (NOERROR, NXDOMAIN or NODATA).
    Allowed,
    /// Not allowed by the policy (or not a host name): REFUSED, nothing forwarded.
    Refused,
    /// Answered as [`Verdict::Allowed`], in audit mode: the policy allowed every name.
    Audit,
    /// Not answered usefully: SERVFAIL (no upstream answered, admission failed), FORMERR or
    /// NOTIMP, with the reason.
    Error(String),
}

impl Verdict {
    /// `allowed`, `refused`, `audit` or `error`, for the audit log.
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Refused => "refused",
            Verdict::Audit => "audit",
            Verdict::Error(_) => "error",
        }
    }
}

/// How long an address answered with this TTL stays in the job's set with the default
/// floor: the TTL the job is told (at most [`MAX_TTL_SECS`]) plus [`TTL_GRACE_SECS`], and
/// never less than [`MIN_TTL_SECS`] (see [`DnsConfig::admit_ttl`]).
pub fn admit_ttl(ttl: u32) -> u32 {
    (ttl.min(MAX_TTL_SECS) + TTL_GRACE_SECS).max(MIN_TTL_SECS)
}

/// A token bucket, refilled continuously.
#[derive(Debug)]
struct Bucket {
    rate: Rate,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: Rate) -> Bucket {
        Bucket {
            rate,
            tokens: f64::from(rate.burst),
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let per_second = f64::from(self.rate.per_second);
        self.tokens = (self.tokens
            + now.saturating_duration_since(self.at).as_secs_f64() * per_second)
            .min(f64::from(self.rate.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_second))
        }
    }
}

/// Waits for a token of `bucket`.
async fn paced(bucket: &std::sync::Mutex<Bucket>) {
    loop {
        let wait = match bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(Instant::now())
        {
            Ok(()) => return,
            Err(wait) => wait,
        };
        tokio::time::sleep(wait).await;
    }
}

/// What the job's cache keeps of an upstream answer: what the job gets of it (see
/// [`relayed`]), when it was stored and when it expires.
#[derive(Debug, Clone)]
struct Cached {
    code: ResponseCode,
    records: Vec<Record>,
    /// The SOA of a negative answer.
    soa: Vec<Record>,
    stored: Instant,
    expires: Instant,
    bytes: usize,
}

impl Cached {
    /// The records with their TTLs lowered by the time spent in the cache.
    fn aged(&self, now: Instant) -> (Vec<Record>, Vec<Record>) {
        let spent =
            u32::try_from(now.saturating_duration_since(self.stored).as_secs()).unwrap_or(u32::MAX);
        let age = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.saturating_sub(spent);
                    r
                })
                .collect()
        };
        (age(&self.records), age(&self.soa))
    }
}

/// One job's answers, by (lowercase name, type), for as long as their TTL says; bounded
/// in entries and bytes. Never shared between jobs.
#[derive(Debug)]
struct Cache {
    entries: std::collections::HashMap<(String, RecordType), Cached>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl Cache {
    fn new(max_entries: usize, max_bytes: usize) -> Cache {
        Cache {
            entries: std::collections::HashMap::new(),
            bytes: 0,
            max_entries,
            max_bytes,
        }
    }

    fn get(&mut self, key: &(String, RecordType), now: Instant) -> Option<Cached> {
        match self.entries.get(key) {
            Some(entry) if entry.expires > now => Some(entry.clone()),
            Some(_) => {
                self.remove(key);
                None
            }
            None => None,
        }
    }

    fn remove(&mut self, key: &(String, RecordType)) {
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= old.bytes;
        }
    }

    /// Keeps the answer for its TTL: the smallest of its records', or for a negative answer
    /// its SOA's (RFC 2308), at most [`MAX_NEGATIVE_TTL_SECS`]. Nothing with a TTL of 0, and
    /// nothing larger than the whole cache. Makes room by dropping what expired, then what
    /// expires soonest.
    fn put(
        &mut self,
        key: (String, RecordType),
        code: ResponseCode,
        records: &[Record],
        soa: &[Record],
        now: Instant,
    ) {
        let ttl = if records.iter().any(|r| r.record_type() != RecordType::CNAME) {
            records.iter().map(|r| r.ttl).min()
        } else {
            soa.iter()
                .filter_map(|r| match &r.data {
                    RData::SOA(s) => Some(r.ttl.min(s.minimum).min(MAX_NEGATIVE_TTL_SECS)),
                    _ => None,
                })
                .min()
        };
        let Some(ttl) = ttl.filter(|&t| t > 0) else {
            return;
        };
        let bytes = key.0.len()
            + records
                .iter()
                .chain(soa)
                .map(|r| std::mem::size_of::<Record>() + r.name.len() + rdata_len(r))
                .sum::<usize>();
        if self.max_entries == 0 || bytes > self.max_bytes {
            return;
        }
        self.remove(&key);
        if self.entries.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            self.entries.retain(|_, e| e.expires > now);
            self.bytes = self.entries.values().map(|e| e.bytes).sum();
        }
        while self.entries.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            let Some(soonest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.expires)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.remove(&soonest);
        }
        self.bytes += bytes;
        self.entries.insert(
            key,
            Cached {
                code,
                records: records.to_vec(),
                soa: soa.to_vec(),
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
                bytes,
            },
        );
    }
}

/// The wire size of a record's data, as a measure of what the agent holds for it.
fn rdata_len(record: &Record) -> usize {
    use hickory_proto::serialize::binary::BinEncodable;
    record.data.to_bytes().map_or(0, |b| b.len())
}

/// A running resolver of one job. Dropping it aborts it; [`DnsServer::shutdown`] also waits
/// until its sockets are closed.
#[derive(Debug)]
pub struct DnsServer {
    task: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl DnsServer {
    /// Stops serving and returns once every socket of the job's resolver is closed: the
    /// listeners and the job's open connections were made in the job's namespace and keep it
    /// alive, so the wipe calls this before it removes the namespace.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the job's resolver on `udp` and `tcp` (bound in the job's namespace, normally on
/// [`RESOLVER_ADDR`]) until the returned handle is shut down or dropped. Must be called
/// inside a tokio runtime. `audit_mode` only changes the verdict of allowed names to
/// [`Verdict::Audit`]: the caller passes a policy that allows every name, and admission still
/// happens (the caller may make it a no-op).
pub fn serve(
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    cfg: DnsConfig,
    allow: AllowFn,
    audit_mode: bool,
    admit: AdmitFn,
    events: mpsc::Sender<DnsEvent>,
) -> Result<DnsServer, DnsError> {
    cfg.check()?;
    tokio::runtime::Handle::try_current().map_err(|_| DnsError::NoRuntime)?;
    let socket_err = |what| move |source| DnsError::Socket { what, source };
    udp.set_nonblocking(true).map_err(socket_err("UDP"))?;
    tcp.set_nonblocking(true).map_err(socket_err("TCP"))?;
    let udp = UdpSocket::from_std(udp).map_err(socket_err("UDP"))?;
    let tcp = TcpListener::from_std(tcp).map_err(socket_err("TCP"))?;
    let resolver = Arc::new(Resolver::new(cfg, allow, audit_mode, admit, events));
    let (stop, stopped) = oneshot::channel();
    Ok(DnsServer {
        task: tokio::spawn(run(resolver, udp, tcp, stopped)),
        stop: Some(stop),
    })
}

/// Times `count` A lookups of `name`, one after the other, over UDP at `server` — the agent's
/// resolver or an upstream directly, for the lookup-latency benchmark. Every lookup must come
/// back NOERROR within `limit`.
pub async fn time_lookups(
    server: SocketAddr,
    name: &str,
    count: usize,
    limit: Duration,
) -> Result<Vec<Duration>, DnsError> {
    let failed = |reason: String| DnsError::Lookup {
        name: name.to_string(),
        server,
        reason,
    };
    let mut qname = Name::from_ascii(name).map_err(|e| failed(e.to_string()))?;
    // As it comes back off the wire, so that replies match it.
    qname.set_fqdn(true);
    let question = Query::query(qname, RecordType::A);
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let query = upstream_query(&question);
        let bytes = query.to_vec().map_err(|e| failed(e.to_string()))?;
        let start = Instant::now();
        let reply = timeout(limit, udp_exchange(server, &query, &bytes))
            .await
            .map_err(|_| failed(format!("no answer within {limit:?}")))?
            .map_err(failed)?;
        times.push(start.elapsed());
        if reply.response_code != ResponseCode::NoError {
            return Err(failed(format!("answered {}", reply.response_code)));
        }
    }
    Ok(times)
}

/// One job's resolver: its configuration and the caller's hooks.
pub(crate) struct Resolver {
    cfg: DnsConfig,
    allow: AllowFn,
    audit_mode: bool,
    admit: AdmitFn,
    events: mpsc::Sender<DnsEvent>,
    cache: std::sync::Mutex<Cache>,
    /// Every query read from the job's sockets.
    query_limit: std::sync::Mutex<Bucket>,
    /// Every query forwarded upstream.
    upstream_limit: std::sync::Mutex<Bucket>,
}

/// How a query of the job arrived (a UDP reply may have to be truncated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// Reads the job's sockets until stopped. Every query and connection runs as a task of
/// `tasks`, which is aborted and awaited on the way out, so no socket of the job outlives
/// this function.
async fn run(
    resolver: Arc<Resolver>,
    udp: UdpSocket,
    tcp: TcpListener,
    mut stopped: oneshot::Receiver<()>,
) {
    let udp = Arc::new(udp);
    let queries = Arc::new(Semaphore::new(resolver.cfg.max_in_flight));
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(_) = tasks.join_next() => {}
            // The permit and the rate come first: at either limit the datagrams stay in the
            // kernel's queue.
            (permit, received) = async {
                let permit = queries.clone().acquire_owned().await;
                paced(&resolver.query_limit).await;
                let received = udp
                    .recv_from(&mut buf)
                    .await
                    .map(|(len, peer)| (buf[..len].to_vec(), peer));
                (permit, received)
            } => {
                let Ok(permit) = permit else { break };
                match received {
                    Ok((query, peer)) => {
                        let resolver = resolver.clone();
                        let udp = udp.clone();
                        tasks.spawn(async move {
                            if let Some(reply) = resolver.answer(&query, Transport::Udp).await {
                                let _ = udp.send_to(&reply, peer).await;
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "job resolver: UDP receive failed");
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            (permit, accepted) = async {
                let permit = connections.clone().acquire_owned().await;
                (permit, tcp.accept().await)
            } => {
                let Ok(permit) = permit else { break };
                match accepted {
                    Ok((stream, _)) => {
                        tasks.spawn(serve_connection(
                            resolver.clone(),
                            stream,
                            queries.clone(),
                            permit,
                        ));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "job resolver: TCP accept failed");
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
        }
    }
    tasks.shutdown().await;
}

/// One TCP connection of the job: length-prefixed queries, answered in order, until the job
/// closes it, stays idle for [`DnsConfig::tcp_idle_timeout`] or sends something unanswerable.
async fn serve_connection(
    resolver: Arc<Resolver>,
    mut stream: TcpStream,
    queries: Arc<Semaphore>,
    _connection: OwnedSemaphorePermit,
) {
    let idle = resolver.cfg.tcp_idle_timeout;
    loop {
        let query = match timeout(idle, read_message(&mut stream)).await {
            Ok(Ok(Some(query))) => query,
            _ => return,
        };
        paced(&resolver.query_limit).await;
        let Ok(_permit) = queries.acquire().await else {
            return;
        };
        let Some(reply) = resolver.answer(&query, Transport::Tcp).await else {
            return;
        };
        if !matches!(
            timeout(idle, write_message(&mut stream, &reply)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
}

impl Resolver {
    /// `cfg` must have passed [`DnsConfig::check`].
    pub(crate) fn new(
        cfg: DnsConfig,
        allow: AllowFn,
        audit_mode: bool,
        admit: AdmitFn,
        events: mpsc::Sender<DnsEvent>,
    ) -> Resolver {
        Resolver {
            cache: std::sync::Mutex::new(Cache::new(cfg.cache_entries, cfg.cache_bytes)),
            query_limit: std::sync::Mutex::new(Bucket::new(cfg.query_rate)),
            upstream_limit: std::sync::Mutex::new(Bucket::new(cfg.upstream_rate)),
            cfg,
            allow,
            audit_mode,
            admit,
            events,
        }
    }

    /// The reply to one query of the job, or `None` to send nothing (not a query at all).
    pub(crate) async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(_) => return self.unreadable(query),
        };
        if request.message_type != MessageType::Query {
            return None;
        }
        if request.op_code != OpCode::Query {
            let reason = format!("opcode {:?} not implemented", request.op_code);
            self.event("", "", Verdict::Error(reason), Vec::new(), None);
            return encode(&reply_to(&request, ResponseCode::NotImp, false));
        }
        if request.queries.len() != 1 {
            let reason = format!("{} questions in one query", request.queries.len());
            self.event("", "", Verdict::Error(reason), Vec::new(), None);
            return encode(&reply_to(&request, ResponseCode::FormErr, false));
        }
        if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            let reason = format!(
                "EDNS version {}",
                request.edns.as_ref().map_or(0, Edns::version)
            );
            self.event("", "", Verdict::Error(reason), Vec::new(), None);
            return encode(&reply_to(&request, ResponseCode::BADVERS, false));
        }
        let question = &request.queries[0];
        let qtype = question.query_type();
        let qtype_name = type_name(qtype);
        let allowed = match host_name(question.name()) {
            Some(name) if question.query_class() == DNSClass::IN && (self.allow)(&name) => name,
            name => {
                let name = name.unwrap_or_else(|| printable(question.name()));
                self.event(&name, &qtype_name, Verdict::Refused, Vec::new(), None);
                return encode(&reply_to(&request, ResponseCode::Refused, true));
            }
        };
        let verdict = if self.audit_mode {
            Verdict::Audit
        } else {
            Verdict::Allowed
        };
        match qtype {
            RecordType::A | RecordType::AAAA | RecordType::CNAME => {
                self.resolve(&request, allowed, verdict, transport).await
            }
            RecordType::ANY => {
                // RFC 8482: a synthesised HINFO instead of everything the name has.
                let mut reply = reply_to(&request, ResponseCode::NoError, true);
                reply.add_answer(Record::from_rdata(
                    question.name().clone(),
                    ANY_TTL_SECS,
                    RData::HINFO(HINFO::new("RFC8482".into(), String::new())),
                ));
                self.event(
                    &allowed,
                    &qtype_name,
                    verdict,
                    Vec::new(),
                    Some(ANY_TTL_SECS),
                );
                encode(&reply)
            }
            _ => {
                self.event(&allowed, &qtype_name, verdict, Vec::new(), None);
                encode(&reply_to(&request, ResponseCode::NoError, true))
            }
        }
    }

    /// FORMERR for a query whose header can be read, nothing for anything else.
    fn unreadable(&self, query: &[u8]) -> Option<Vec<u8>> {
        let header = Header::read(&mut BinDecoder::new(query)).ok()?;
        if header.message_type != MessageType::Query {
            return None;
        }
        let reason = "malformed query".to_string();
        self.event("", "", Verdict::Error(reason), Vec::new(), None);
        Message::error_msg(header.id, header.op_code, ResponseCode::FormErr)
            .to_vec()
            .ok()
    }

    /// Forwards an allowed A, AAAA or CNAME query, admits the answer's addresses, and then
    /// — only then — returns the reply.
    async fn resolve(
        &self,
        request: &Message,
        name: String,
        verdict: Verdict,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let question = &request.queries[0];
        let qtype = type_name(question.query_type());
        let servfail = |reason: String| {
            self.event(&name, &qtype, Verdict::Error(reason), Vec::new(), None);
            encode(&reply_to(request, ResponseCode::ServFail, true))
        };
        let key = (name.clone(), question.query_type());
        let now = Instant::now();
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key, now);
        let (code, records, soa) = match cached {
            // Admitted again below, like a fresh answer: a pair the set holds long enough
            // costs nothing, and one that does not is never released unadmitted.
            Some(hit) => {
                let (records, soa) = hit.aged(now);
                (hit.code, records, soa)
            }
            None => {
                let limited = self
                    .upstream_limit
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take(now);
                if limited.is_err() {
                    let rate = self.cfg.upstream_rate;
                    return servfail(format!(
                        "rate limit: the job asked for more than {} uncached answers a second (burst {}); nothing was forwarded",
                        rate.per_second, rate.burst
                    ));
                }
                let upstream = match self.forward(question).await {
                    Ok(upstream) => upstream,
                    Err(reason) => return servfail(reason),
                };
                let records = relayed(question, &upstream);
                let soa: Vec<Record> = upstream
                    .authorities
                    .iter()
                    .filter(|r| r.record_type() == RecordType::SOA)
                    .map(capped)
                    .collect();
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).put(
                    key,
                    upstream.response_code,
                    &records,
                    &soa,
                    Instant::now(),
                );
                (upstream.response_code, records, soa)
            }
        };
        let addrs = addresses(question.query_type(), &records, &self.cfg);
        let mut reply = reply_to(request, code, true);
        if addrs.is_empty() {
            // The SOA tells the job how long it may remember that there is nothing.
            reply.add_authorities(soa);
        }
        let ttl = records.iter().map(|r| r.ttl).min();
        reply.add_answers(records);
        let bytes = match reply.to_vec() {
            Ok(bytes) => bytes,
            Err(e) => return servfail(format!("cannot encode the reply: {e}")),
        };
        if transport == Transport::Udp && bytes.len() > udp_limit(request) {
            // Nothing is released, so nothing is admitted: the job asks again over TCP.
            self.event(&name, &qtype, verdict, Vec::new(), None);
            let mut truncated = reply_to(request, code, true);
            truncated.metadata.truncation = true;
            return encode(&truncated);
        }
        let released: Vec<IpAddr> = addrs.iter().map(|&(ip, _)| ip).collect();
        if !addrs.is_empty() {
            let admitted = (self.admit)(Answer {
                name: name.clone(),
                addrs,
            });
            match timeout(ADMIT_TIMEOUT, admitted).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return servfail(format!("admission failed: {e}")),
                Err(_) => return servfail(format!("admission took longer than {ADMIT_TIMEOUT:?}")),
            }
        }
        self.event(&name, &qtype, verdict, released, ttl);
        Some(bytes)
    }

    /// The first usable answer of the upstreams, asked in order; a failure names each one's.
    async fn forward(&self, question: &Query) -> Result<Message, String> {
        let mut failures = Vec::new();
        for &upstream in &self.cfg.upstreams {
            match self.exchange(upstream, question).await {
                Ok(reply)
                    if matches!(
                        reply.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    return Ok(reply)
                }
                Ok(reply) => failures.push(format!("{upstream} answered {}", reply.response_code)),
                Err(e) => failures.push(format!("{upstream}: {e}")),
            }
        }
        Err(failures.join("; "))
    }

    /// One upstream: UDP first, TCP if the UDP answer was truncated.
    async fn exchange(&self, upstream: SocketAddr, question: &Query) -> Result<Message, String> {
        let query = upstream_query(question);
        let bytes = query
            .to_vec()
            .map_err(|e| format!("cannot encode the query: {e}"))?;
        let limit = self.cfg.timeout;
        let reply = timeout(limit, udp_exchange(upstream, &query, &bytes))
            .await
            .map_err(|_| format!("no answer over UDP within {limit:?}"))??;
        if !reply.truncation {
            return Ok(reply);
        }
        timeout(limit, tcp_exchange(upstream, &query, &bytes))
            .await
            .map_err(|_| format!("no answer over TCP within {limit:?}"))?
    }

    /// Never waits: the audit is the caller's, and a full channel loses the event.
    fn event(
        &self,
        name: &str,
        qtype: &str,
        verdict: Verdict,
        answers: Vec<IpAddr>,
        ttl: Option<u32>,
    ) {
        let _ = self.events.try_send(DnsEvent {
            name: name.to_string(),
            qtype: qtype.to_string(),
            verdict,
            answers,
            ttl,
        });
    }
}

/// The agent's own query for the job's question: a fresh ID, recursion desired, EDNS with the
/// agent's payload size, and nothing else of the job's message (no EDNS options, no DO or CD
/// bit), so the name is all the job puts on the wire.
fn upstream_query(question: &Query) -> Message {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_UDP_PAYLOAD);
    query.set_edns(edns);
    query
}

/// Does `reply` answer `query`? Anything else is a late or forged message.
fn answers(reply: &Message, query: &Message) -> bool {
    reply.id == query.id
        && reply.message_type == MessageType::Response
        && reply.op_code == OpCode::Query
        && (reply.queries == query.queries
            // Some servers leave the question out of an error.
            || (reply.queries.is_empty() && reply.response_code != ResponseCode::NoError))
}

/// From a fresh socket in the agent's (host) namespace, connected to `upstream`: replies from
/// anywhere else never arrive, and ones that do not match the query are ignored until the
/// caller's timeout ends the wait.
async fn udp_exchange(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Message, String> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    socket
        .connect(upstream)
        .await
        .map_err(|e| format!("UDP: {e}"))?;
    socket.send(bytes).await.map_err(|e| format!("UDP: {e}"))?;
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        let len = socket
            .recv(&mut buf)
            .await
            .map_err(|e| format!("UDP: {e}"))?;
        if let Ok(reply) = Message::from_vec(&buf[..len]) {
            if answers(&reply, query) {
                return Ok(reply);
            }
        }
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    query: &Message,
    bytes: &[u8],
) -> Result<Message, String> {
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(|e| format!("TCP: {e}"))?;
    write_message(&mut stream, bytes)
        .await
        .map_err(|e| format!("TCP: {e}"))?;
    let reply = read_message(&mut stream)
        .await
        .map_err(|e| format!("TCP: {e}"))?
        .ok_or("TCP: closed without an answer")?;
    let reply = Message::from_vec(&reply).map_err(|e| format!("TCP: unreadable answer: {e}"))?;
    if !answers(&reply, query) {
        return Err("TCP: the answer does not match the query".into());
    }
    Ok(reply)
}

/// One length-prefixed DNS message (RFC 1035 4.2.2); `None` when the peer closed the
/// connection between messages or sent an empty one.
async fn read_message<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len == 0 {
        return Ok(None);
    }
    let mut message = vec![0u8; len];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

/// Prefix and message in one write, so they leave in one segment.
async fn write_message<S: AsyncWrite + Unpin>(stream: &mut S, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// What the job gets of an upstream answer: the CNAME chain from the question's name and the
/// records of the question's type at its end (TTLs capped at [`MAX_TTL_SECS`]). Records of
/// other names or types are dropped, so every address the job sees is one of
/// [`addresses`], which are admitted before the job sees them.
fn relayed(question: &Query, upstream: &Message) -> Vec<Record> {
    let qtype = question.query_type();
    let mut owner = question.name();
    let mut records = Vec::new();
    for _ in 0..MAX_CNAME_CHAIN {
        let alias = upstream.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if r.name == *owner => Some((r, &target.0)),
            _ => None,
        });
        let Some((record, target)) = alias else { break };
        records.push(capped(record));
        owner = target;
        if qtype == RecordType::CNAME {
            return records;
        }
    }
    records.extend(
        upstream
            .answers
            .iter()
            .filter(|r| r.name == *owner && r.record_type() == qtype)
            .map(capped),
    );
    records
}

/// The addresses of relayed `records` (those of the asked type; the CNAMEs carry none),
/// each once, with how long it stays in the job's set ([`DnsConfig::admit_ttl`] of its
/// longest TTL).
fn addresses(qtype: RecordType, records: &[Record], cfg: &DnsConfig) -> Vec<(IpAddr, u32)> {
    let mut addrs: Vec<(IpAddr, u32)> = Vec::new();
    for record in records.iter().filter(|r| r.record_type() == qtype) {
        let Some(ip) = record.data.ip_addr() else {
            continue;
        };
        let ttl = cfg.admit_ttl(record.ttl);
        match addrs.iter_mut().find(|(known, _)| *known == ip) {
            Some((_, longest)) => *longest = (*longest).max(ttl),
            None => addrs.push((ip, ttl)),
        }
    }
    addrs
}

fn capped(record: &Record) -> Record {
    let mut record = record.clone();
    record.ttl = record.ttl.min(MAX_TTL_SECS);
    record
}

/// A reply to the job's `request`: its ID, question (as the job wrote it, case included),
/// RD and CD bits; recursion available; EDNS if the job used it.
fn reply_to(request: &Message, code: ResponseCode, with_question: bool) -> Message {
    let mut reply = Message::response(request.id, request.op_code);
    reply.metadata.recursion_desired = request.recursion_desired;
    reply.metadata.checking_disabled = request.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.response_code = code;
    if with_question {
        reply.add_queries(request.queries.iter().cloned());
    }
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(JOB_UDP_PAYLOAD);
        reply.set_edns(edns);
    }
    reply
}

fn encode(reply: &Message) -> Option<Vec<u8>> {
    match reply.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::debug!(error = %e, "job resolver: cannot encode a reply");
            None
        }
    }
}

/// The largest UDP reply this job's query takes: 512 bytes, or what its EDNS announces.
fn udp_limit(request: &Message) -> usize {
    let announced = request.edns.as_ref().map_or(512, Edns::max_payload);
    usize::from(announced.clamp(512, JOB_UDP_PAYLOAD))
}

/// The name as the policy sees it: lowercase, labels joined by dots, no trailing dot. `None`
/// for the root and for names with bytes no host name has — they are refused, and a policy
/// pattern can never be fooled by an escaped dot inside a label.
fn host_name(name: &Name) -> Option<String> {
    if name.is_root() {
        return None;
    }
    let mut out = String::with_capacity(name.len());
    for label in name.iter() {
        let host_label = !label.is_empty()
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !host_label {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(label.iter().map(|&b| char::from(b.to_ascii_lowercase())));
    }
    Some(out)
}

/// A refused non-host name for the audit: escaped as in a zone file, lowercase, no final dot.
fn printable(name: &Name) -> String {
    let ascii = name.to_lowercase().to_ascii();
    ascii.strip_suffix('.').unwrap_or(&ascii).to_string()
}

/// `A`, `TXT`, …, and RFC 3597's `TYPE<n>` for types hickory has no name for.
fn type_name(qtype: RecordType) -> String {
    match qtype {
        RecordType::Unknown(code) => format!("TYPE{code}"),
        known => known.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example.internal\nnameserver 127.0.0.53 # stub\n\
                    options edns0 trust-ad\n;nameserver 192.0.2.9\nnameserver fe80::1%eth0\n\
                    nameserver not-an-ip\nnameserver 2001:db8::53\nnameserver 127.0.0.53\n\
                    nameserver 192.0.2.1\nnameserver 192.0.2.2\n";
        let cfg = DnsConfig::from_resolv_conf(text).unwrap();
        let expected: Vec<SocketAddr> = vec![
            "127.0.0.53:53".parse().unwrap(),
            "[2001:db8::53]:53".parse().unwrap(),
            "192.0.2.1:53".parse().unwrap(),
        ];
        assert_eq!(cfg.upstreams, expected);
        assert_eq!(cfg.timeout, DEFAULT_TIMEOUT);
        assert_eq!(cfg.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert!(matches!(
            DnsConfig::from_resolv_conf("search example.com\n# nameserver 192.0.2.1\n"),
            Err(DnsError::NoUpstreams)
        ));
    }

    #[test]
    fn config_is_checked() {
        let mut cfg = DnsConfig::new(vec!["192.0.2.1:53".parse().unwrap()]);
        assert!(cfg.check().is_ok());
        cfg.max_in_flight = 0;
        assert!(matches!(cfg.check(), Err(DnsError::Config(_))));
        cfg.max_in_flight = 1;
        cfg.timeout = Duration::ZERO;
        assert!(matches!(cfg.check(), Err(DnsError::Config(_))));
        assert!(matches!(
            DnsConfig::new(Vec::new()).check(),
            Err(DnsError::NoUpstreams)
        ));
    }

    #[test]
    fn host_names_as_the_policy_sees_them() {
        let name = |s: &str| Name::from_ascii(s).unwrap();
        assert_eq!(
            host_name(&name("API.Example.COM.")).as_deref(),
            Some("api.example.com")
        );
        assert_eq!(
            host_name(&name("_dmarc.example.com")).as_deref(),
            Some("_dmarc.example.com")
        );
        assert_eq!(host_name(&Name::root()), None);
        // One label "evil.example" under "com": never "evil.example.com" to a suffix match.
        let escaped = Name::from_labels(vec![&b"evil.example"[..], &b"com"[..]]).unwrap();
        assert_eq!(host_name(&escaped), None);
        assert_eq!(printable(&escaped), "evil\\.example.com");
        let binary = Name::from_labels(vec![&b"a\x00b"[..], &b"example"[..]]).unwrap();
        assert_eq!(host_name(&binary), None);
        assert_eq!(host_name(&name("*.example.com")), None);
    }

    #[test]
    fn ttls_in_the_set() {
        assert_eq!(admit_ttl(0), MIN_TTL_SECS);
        assert_eq!(admit_ttl(300), 300 + TTL_GRACE_SECS);
        assert_eq!(admit_ttl(86_400), MAX_TTL_SECS + TTL_GRACE_SECS);
        assert_eq!(admit_ttl(u32::MAX), MAX_TTL_SECS + TTL_GRACE_SECS);
    }

    #[test]
    fn negative_answers_are_cached_by_their_soa_and_zero_ttls_not_at_all() {
        use hickory_proto::rr::rdata::{A, SOA};
        let name = Name::from_ascii("gone.example.com.").unwrap();
        let soa = |ttl, minimum| {
            Record::from_rdata(
                Name::from_ascii("example.com.").unwrap(),
                ttl,
                RData::SOA(SOA::new(
                    Name::from_ascii("ns.example.com.").unwrap(),
                    Name::from_ascii("admin.example.com.").unwrap(),
                    1,
                    3600,
                    600,
                    86_400,
                    minimum,
                )),
            )
        };
        let now = Instant::now();
        let key = |n: &str| (n.to_string(), RecordType::A);
        let mut cache = Cache::new(8, 64 * 1024);
        // RFC 2308: the smaller of the SOA's TTL and minimum, capped.
        cache.put(key("a"), ResponseCode::NXDomain, &[], &[soa(900, 60)], now);
        cache.put(
            key("b"),
            ResponseCode::NXDomain,
            &[],
            &[soa(86_400, 86_400)],
            now,
        );
        cache.put(key("c"), ResponseCode::NXDomain, &[], &[], now);
        let a0 = Record::from_rdata(name.clone(), 0, RData::A(A::new(192, 0, 2, 1)));
        cache.put(key("d"), ResponseCode::NoError, &[a0], &[], now);
        let ttl = |k: &str| {
            cache
                .entries
                .get(&key(k))
                .map(|e| e.expires.duration_since(now).as_secs())
        };
        assert_eq!(ttl("a"), Some(60));
        assert_eq!(ttl("b"), Some(u64::from(MAX_NEGATIVE_TTL_SECS)));
        assert_eq!(ttl("c"), None, "a negative answer without an SOA");
        assert_eq!(ttl("d"), None, "TTL 0");
        // Aged: the remaining TTL, and gone once expired.
        let a = Record::from_rdata(name, 30, RData::A(A::new(192, 0, 2, 1)));
        cache.put(key("e"), ResponseCode::NoError, &[a], &[], now);
        let hit = cache.get(&key("e"), now + Duration::from_secs(12)).unwrap();
        assert_eq!(hit.aged(now + Duration::from_secs(12)).0[0].ttl, 18);
        assert!(cache
            .get(&key("e"), now + Duration::from_secs(30))
            .is_none());
        assert_eq!(
            cache.bytes,
            cache.entries.values().map(|e| e.bytes).sum::<usize>()
        );
    }

    #[test]
    fn the_bucket_gives_its_burst_then_its_rate() {
        let start = Instant::now();
        let mut b = Bucket::new(Rate {
            per_second: 10,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(b.take(start).is_ok());
        }
        let wait = b.take(start).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(b.take(start + Duration::from_millis(100)).is_ok());
        assert!(b.take(start + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name(RecordType::AAAA), "AAAA");
        assert_eq!(type_name(RecordType::Unknown(65_280)), "TYPE65280");
        assert_eq!(Verdict::Error("x".into()).as_str(), "error");
    }
}
