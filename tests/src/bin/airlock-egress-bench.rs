//! `airlock-egress-bench`: the egress benchmarks of `make bench` (root only, needs `nft` and
//! `ip`).
//!
//! 1. Throughput: bulk TCP (512 MiB in 64 KiB writes) from inside an egress-controlled job's
//!    namespace to a sink in a test "internet" namespace (`airlock_tests::internet`), against
//!    the same transfer from a reference namespace, N runs each, interleaved. The job is what
//!    the daemon builds (`NetManager::create` in `NetMode::Egress`, block mode) with the
//!    sink's address and port admitted into its set (`admit_addresses`, as the resolver does
//!    for an answered name). The reference is an outbound job's namespace whose table
//!    `inet airlock` is deleted: both cross a veth, the host's forwarding, its table and its
//!    masquerade, and differ only by the job's rules (and the connection tracking they bring
//!    into the namespace). The sink reads each connection to its end and answers with the
//!    number of bytes it read, so a run is timed from the first write until every byte has
//!    arrived.
//! 2. DNS: A lookups of an allowed name, one after the other (`time_lookups`), from inside
//!    the job's namespace through the agent's resolver (`dns::serve` on `RESOLVER_ADDR` in the
//!    namespace, forwarding to a fake upstream on the host's loopback with the cache off, each
//!    answer admitted into the job's set over nf_tables netlink before the reply is released,
//!    as the agent does), against the same lookups straight to the upstream from the host's
//!    namespace; and, to tell the two costs apart, through the resolver with the admission
//!    skipped. Interleaved in batches. Then the same lookups with the agent's defaults,
//!    answered from the job's cache. The admission is also timed on its own: a new pair and
//!    a refreshed one over netlink (the agent's way), against the same with an `nft` process
//!    (the agent's way before, the reference).
//!
//! The last line is `key=value` pairs; each figure is also printed in words above it.
//! Target (issue 4): throughput through the job's rules ≥ 0.9× the reference. The lookup
//! latency has none; it shows what the agent adds. Everything it creates (the jobs' networks,
//! the test internet, the resolver's and the sink's sockets) is removed on success and on
//! failure (a guard), and the jobs' networks are verified gone. The host's `inet airlock`
//! table and IPv4 forwarding stay, as they do after the agent's own outbound jobs.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use airlock::egress::dns::{
    self, AdmitFn, AllowFn, Answer, DnsConfig, DnsEvent, DnsServer, Rate, Verdict, RESOLVER_ADDR,
};
use airlock::egress::nftset;
use airlock::jobs::new_job_id;
use airlock::sandbox::firewall::{self, EgressRules};
use airlock::sandbox::netns::{
    bind_in_netns, run_in_netns, JobNet, NetConfig, NetManager, NetMode,
};
use airlock_tests::fakedns::{FakeDns, Zone};
use airlock_tests::internet::Internet;

/// Subnets of the bench's jobs; only ever inside their own namespaces.
const POOL: &str = "10.210.0.0/24";
/// The test internet's /24 (a documentation range; a free /30 of it is taken).
const INTERNET_RANGE: [u8; 3] = [198, 51, 100];
/// The sink's port, admitted for the job.
const SINK_PORT: u16 = 9000;
/// The port the allowed name is admitted on (nothing listens there).
const NAME_PORT: u16 = 443;
/// The allowed name, answered by the fake upstream with the test internet's address.
const NAME: &str = "allowed.test";
const NAME_TTL: u32 = 300;
/// The sender's write size.
const CHUNK: usize = 64 * 1024;
/// Lookups per batch; the three kinds take turns batch by batch.
const BATCH: usize = 20;
/// Untimed lookups of each kind before the timed ones.
const WARM_UP_LOOKUPS: usize = 5;
const LOOKUP_LIMIT: Duration = Duration::from_secs(2);
/// Rates no lookup of the bench reaches, for the resolver that times uncached answers.
const UNLIMITED: Rate = Rate {
    per_second: 1_000_000,
    burst: 1_000_000,
};
/// Admissions timed of each kind (netlink and `nft`, new pair and refresh).
const ADMISSION_SAMPLES: u8 = 50;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A transfer that stalls this long fails the bench.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

type Res<T> = Result<T, String>;

#[derive(Debug)]
struct Options {
    runs: usize,
    mib: u64,
    lookups: usize,
}

fn usage() -> String {
    "usage: airlock-egress-bench [--runs N (5)] [--mib N (512)] [--lookups N (200)]\n\
     (runs as root; needs nft and ip)"
        .to_string()
}

fn parse_options(args: &[String]) -> Res<Options> {
    let (mut runs, mut mib, mut lookups) = (5usize, 512usize, 200usize);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--runs" => &mut runs,
            "--mib" => &mut mib,
            "--lookups" => &mut lookups,
            _ => return Err(usage()),
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .filter(|&v: &usize| v > 0)
            .ok_or_else(usage)?;
    }
    Ok(Options {
        runs,
        mib: mib as u64,
        lookups,
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_options(&args).and_then(|o| run(&o)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("airlock-egress-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> Res<()> {
    if airlock_tests::prereq::is_root() {
        Ok(())
    } else {
        Err(
            "must run as root: the bench makes network namespaces, links and nftables rules"
                .to_string(),
        )
    }
}

/// `tool` in /usr/sbin or on PATH, or an error naming the package that has it.
fn find_tool(tool: &str, package: &str) -> Res<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/sbin"))
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("{tool} not found in /usr/sbin or on PATH: install {package} (Debian: apt-get install {package})")
        })
}

/// The receiving end, in the test internet: reads each connection to its end, discards what
/// it read and answers with the count (8 bytes, big-endian). One connection at a time.
struct Sink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(internet: &Internet) -> Res<Sink> {
        let addr = SocketAddr::from((internet.addr, SINK_PORT));
        let listener = bind_in_netns(&internet.path(), &[addr])
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or("no sink listener")?;
        listener
            .set_nonblocking(false)
            .map_err(|e| format!("sink listener: {e}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("bench-sink".into())
                .spawn(move || sink(&listener, &stop))
                .map_err(|e| format!("sink thread: {e}"))?
        };
        Ok(Sink {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the sink's thread: a connection from the host (which reaches the test internet
    /// directly) wakes its `accept`.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT).is_ok() {
                let _ = thread.join();
            }
        }
    }
}

fn sink(listener: &TcpListener, stop: &AtomicBool) {
    let mut buf = vec![0u8; 256 * 1024];
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        let mut total: u64 = 0;
        let complete = loop {
            match conn.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        if complete {
            let _ = conn.write_all(&total.to_be_bytes());
        }
    }
}

/// Sends `bytes` from inside the namespace at `ns` to the sink at `to` in CHUNK writes, and
/// returns the time from the first write until the sink's count came back (it only answers
/// once it has read the end of the stream). The count must be what was sent.
fn transfer(ns: &Path, to: SocketAddr, bytes: u64) -> Res<Duration> {
    run_in_netns(ns, move || -> Res<Duration> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| format!("transfer to {to}: {what}: {e}")
        };
        let mut conn = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map_err(io("connect"))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))
            .and_then(|()| conn.set_read_timeout(Some(IO_TIMEOUT)))
            .map_err(io("timeouts"))?;
        let chunk = vec![0x5a_u8; CHUNK];
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            conn.write_all(&chunk[..n]).map_err(io("write"))?;
            left -= n as u64;
        }
        conn.shutdown(Shutdown::Write).map_err(io("shutdown"))?;
        let mut count = [0u8; 8];
        conn.read_exact(&mut count)
            .map_err(io("reading the sink's count"))?;
        let took = start.elapsed();
        let read = u64::from_be_bytes(count);
        if read != bytes {
            return Err(format!(
                "transfer to {to}: the sink read {read} bytes of {bytes}"
            ));
        }
        Ok(took)
    })
    .map_err(|e| e.to_string())?
}

/// A TCP connection attempt from inside the namespace at `ns`: what `connect` said.
fn connect_from(ns: &Path, to: SocketAddr) -> Res<std::io::Result<()>> {
    run_in_netns(ns, move || {
        TcpStream::connect_timeout(&to, CONNECT_TIMEOUT).map(drop)
    })
    .map_err(|e| e.to_string())
}

/// `count` timed A lookups of [`NAME`] at `server`, from a thread of their own (inside the
/// namespace at `ns`, or in the host's) with a runtime of its own.
fn lookups(ns: Option<&Path>, server: SocketAddr, count: usize) -> Res<Vec<Duration>> {
    let client = move || -> Res<Vec<Duration>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(dns::time_lookups(server, NAME, count, LOOKUP_LIMIT))
            .map_err(|e| e.to_string())
    };
    match ns {
        Some(ns) => run_in_netns(ns, client).map_err(|e| e.to_string())?,
        None => std::thread::Builder::new()
            .name("bench-dns-client".into())
            .spawn(client)
            .map_err(|e| format!("client thread: {e}"))?
            .join()
            .map_err(|_| "the lookup thread panicked".to_string())?,
    }
}

/// The resolver's admission hook, as the agent's: the answer's IPv4 addresses on the name's
/// port go into the job's set over nf_tables netlink (one batch per answer, through a socket
/// made in the job's namespace) before the reply is released. `on` off skips it, to time the resolver alone; `times` records each run.
#[derive(Debug, Default)]
struct Admission {
    on: AtomicBool,
    times: Mutex<Vec<Duration>>,
}

fn admitter(ns: PathBuf, admission: Arc<Admission>) -> Res<AdmitFn> {
    // The agent's own hook, for a policy that allows NAME on NAME_PORT: it adds a pair the
    // set does not hold yet, refreshes one about to expire, and leaves the rest alone.
    let text = format!(
        "[[rule]]\nname = \"bench\"\n[rule.match]\nprovider = \"github\"\nrepository = \"acme/bench\"\n\
         [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
         [rule.egress]\nallow = [\"{NAME}:{NAME_PORT}\"]\n"
    );
    let policy = airlock::policy::load_str(std::path::Path::new("bench.toml"), &text)
        .expect("the bench's policy loads")
        .egress_for("bench")
        .expect("the bench's rule has [rule.egress]");
    let sets = nftset::open_in_netns(&ns).map_err(|e| e.to_string())?;
    let agent = airlock::egress::job::admission(sets, Arc::new(policy), false);
    Ok(Arc::new(move |answer: Answer| {
        let agent = agent.clone();
        let admission = admission.clone();
        Box::pin(async move {
            if !admission.on.load(Ordering::SeqCst) {
                return Ok(());
            }
            let start = Instant::now();
            agent(answer).await?;
            admission
                .times
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(start.elapsed());
            Ok(())
        })
    }))
}

/// What the resolver reported: allowed queries, and anything else (which fails the bench).
#[derive(Debug, Default)]
struct Tally {
    allowed: usize,
    unexpected: Vec<String>,
}

/// The bench's objects. Dropping it (on failure) stops the resolver and the sink, tears down
/// every job still recorded and removes the test internet.
struct Bench {
    rt: tokio::runtime::Runtime,
    net: NetManager,
    nft: PathBuf,
    /// Jobs whose network may exist.
    live: Vec<String>,
    resolver: Option<DnsServer>,
    sink: Option<Sink>,
    internet: Option<Internet>,
}

impl Bench {
    fn new() -> Res<Bench> {
        require_root()?;
        let nft = find_tool("nft", "nftables")?;
        find_tool("ip", "iproute2")?;
        // Worker threads for the netlink connection and the resolver, all in the host's
        // namespace; the clients run on threads of their own.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let net = {
            let _enter = rt.enter();
            NetManager::new(NetConfig {
                pool: POOL.parse().map_err(|e| format!("pool {POOL}: {e}"))?,
                pool6: None,
                ..NetConfig::default()
            })
            .map_err(|e| e.to_string())?
        };
        Ok(Bench {
            rt,
            net,
            nft,
            live: Vec::new(),
            resolver: None,
            sink: None,
            internet: None,
        })
    }

    fn job(&mut self, mode: NetMode) -> Res<JobNet> {
        let id = new_job_id();
        self.live.push(id.clone());
        self.rt
            .block_on(self.net.create(&id, mode))
            .map_err(|e| format!("job {id}'s network: {e}"))
    }

    /// Deletes the job's table inside its namespace: what is left is the path every outbound
    /// job has, without rules of its own.
    fn drop_job_table(&self, net: &JobNet) -> Res<()> {
        let nft = self.nft.clone();
        let out = run_in_netns(&net.ns_path, move || {
            Command::new(&nft)
                .args(["delete", "table", "inet", firewall::TABLE])
                .stdin(Stdio::null())
                .output()
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{}: {e}", self.nft.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nft delete table inet {} in {}: {}",
                firewall::TABLE,
                net.ns_path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Stops the resolver (its sockets keep the job's namespace) and the sink, tears down
    /// every recorded job and verifies its network gone, and removes the test internet.
    /// Tries everything; returns what failed or remained.
    fn finish(&mut self) -> Res<()> {
        let mut problems = Vec::new();
        if let Some(resolver) = self.resolver.take() {
            self.rt.block_on(resolver.shutdown());
        }
        if let Some(mut sink) = self.sink.take() {
            sink.stop();
        }
        for id in std::mem::take(&mut self.live) {
            if let Err(e) = self.rt.block_on(self.net.teardown(&id)) {
                problems.push(format!("teardown of job {id}: {e}"));
                continue;
            }
            match self.rt.block_on(self.net.verify_gone(&id)) {
                Ok(left) => {
                    problems.extend(left.iter().map(|l| format!("job {id}: {l} remains")));
                }
                Err(e) => problems.push(format!("verification of job {id}: {e}")),
            }
        }
        if let Some(internet) = self.internet.take() {
            let path = internet.path();
            drop(internet);
            if path.symlink_metadata().is_ok() {
                problems.push(format!(
                    "test internet namespace {} remains",
                    path.display()
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("airlock-egress-bench: cleanup: {e}");
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of `v` (sorted here), `p` in 0..=100.
fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    let rank = (v.len() * p).div_ceil(100).max(1);
    v[rank - 1]
}

fn mibs(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn run(o: &Options) -> Res<()> {
    let mut b = Bench::new()?;
    let internet = std::panic::catch_unwind(|| Internet::new(INTERNET_RANGE)).map_err(|_| {
        "cannot make the test internet namespace with `ip` (see the message above)".to_string()
    })?;
    let host = internet.addr;
    let internet_name = internet.name.clone();
    b.sink = Some(Sink::start(&internet)?);
    b.internet = Some(internet);
    let sink_addr = SocketAddr::from((host, SINK_PORT));

    let job = b.job(NetMode::Egress(EgressRules {
        audit: false,
        static_v4: vec![],
        static_v6: vec![],
        log_group: 1,
    }))?;
    let reference = b.job(NetMode::Outbound)?;
    b.drop_job_table(&reference)?;
    println!(
        "egress benchmark: test internet {internet_name} ({host}), sink {sink_addr}; job {} ({}), reference {} (outbound, its table deleted); {}",
        job.job_id,
        job.mode,
        reference.job_id,
        b.nft.display()
    );

    // 1. Throughput. The job's rules refuse the sink until it is admitted.
    if let Ok(()) = connect_from(&job.ns_path, sink_addr)? {
        return Err(format!(
            "the job reached {sink_addr} before it was admitted: its rules are not in force"
        ));
    }
    firewall::apply_in_netns(
        &job.ns_path,
        firewall::admit_addresses(&[(host.into(), SINK_PORT)], 600),
        "admission of the sink",
    )
    .map_err(|e| e.to_string())?;
    let bytes = o.mib * MIB;
    transfer(&job.ns_path, sink_addr, bytes.min(64 * MIB))?;
    transfer(&reference.ns_path, sink_addr, bytes.min(64 * MIB))?;
    let (mut through_job, mut through_ref) = (Vec::new(), Vec::new());
    for run in 0..o.runs {
        // Alternate which goes first, so neither always follows the other.
        for k in 0..2 {
            if (run + k) % 2 == 0 {
                through_job.push(transfer(&job.ns_path, sink_addr, bytes)?);
            } else {
                through_ref.push(transfer(&reference.ns_path, sink_addr, bytes)?);
            }
        }
    }
    let rates = |v: &mut [Duration]| {
        let (fast, median, slow) = (percentile(v, 0), percentile(v, 50), percentile(v, 100));
        (mibs(bytes, median), mibs(bytes, slow), mibs(bytes, fast))
    };
    let (job_mibs, job_min, job_max) = rates(&mut through_job);
    let (ref_mibs, ref_min, ref_max) = rates(&mut through_ref);
    let ratio = job_mibs / ref_mibs;
    println!(
        "throughput, {} runs each of {} MiB in {} KiB writes, interleaved: from the job's namespace (egress rules, block mode, the sink admitted) median {job_mibs:.0} MiB/s (range {job_min:.0}–{job_max:.0}); from the reference namespace (no rules of its own) median {ref_mibs:.0} MiB/s (range {ref_min:.0}–{ref_max:.0})",
        o.runs,
        o.mib,
        CHUNK / 1024
    );
    println!(
        "throughput: job / reference = {ratio:.3} (target >= 0.9: {})",
        verdict(ratio >= 0.9)
    );

    // 2. DNS. The fake upstream answers the allowed name with the test internet's address.
    let upstream = FakeDns::start(Zone::default().a(NAME, host, NAME_TTL));
    let (udp, tcp) = run_in_netns(&job.ns_path, || {
        (
            std::net::UdpSocket::bind(RESOLVER_ADDR),
            std::net::TcpListener::bind(RESOLVER_ADDR),
        )
    })
    .map_err(|e| e.to_string())?;
    let bind_err = |e: std::io::Error| format!("the resolver's socket on {RESOLVER_ADDR}: {e}");
    let (udp, tcp) = (udp.map_err(bind_err)?, tcp.map_err(bind_err)?);
    let admission = Arc::new(Admission::default());
    admission.on.store(true, Ordering::SeqCst);
    let allow: AllowFn = Arc::new(|name: &str| name == NAME);
    let (events, mut received) = tokio::sync::mpsc::channel::<DnsEvent>(4096);
    let tally = b.rt.spawn(async move {
        let mut tally = Tally::default();
        while let Some(event) = received.recv().await {
            if event.verdict == Verdict::Allowed && event.answers == [IpAddr::V4(host)] {
                tally.allowed += 1;
            } else if tally.unexpected.len() < 5 {
                tally.unexpected.push(format!("{event:?}"));
            }
        }
        tally
    });
    // Every lookup is forwarded (no cache) and none is rate-limited: this times the path
    // of an uncached answer. The cache is timed on its own below.
    let mut uncached = DnsConfig::new(vec![upstream.addr]);
    uncached.cache_entries = 0;
    uncached.query_rate = UNLIMITED;
    uncached.upstream_rate = UNLIMITED;
    b.resolver = Some({
        let _enter = b.rt.enter();
        dns::serve(
            udp,
            tcp,
            uncached,
            allow.clone(),
            false,
            admitter(job.ns_path.clone(), admission.clone())?,
            events.clone(),
        )
        .map_err(|e| e.to_string())?
    });
    let name_addr = SocketAddr::from((host, NAME_PORT));
    match connect_from(&job.ns_path, name_addr)? {
        Err(e) if e.kind() != std::io::ErrorKind::ConnectionRefused => {}
        other => {
            return Err(format!(
                "the job reached {name_addr} before {NAME} was resolved ({other:?}): its rules are not in force"
            ))
        }
    }
    lookups(Some(&job.ns_path), RESOLVER_ADDR, WARM_UP_LOOKUPS)?;
    // Admitted: nothing listens on the port, so the test internet itself refuses.
    match connect_from(&job.ns_path, name_addr)? {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => {
            return Err(format!(
                "after the lookups of {NAME} the job still cannot reach {name_addr} ({other:?}): the answer was not admitted"
            ))
        }
    }
    lookups(None, upstream.addr, WARM_UP_LOOKUPS)?;
    admission.on.store(false, Ordering::SeqCst);
    lookups(Some(&job.ns_path), RESOLVER_ADDR, WARM_UP_LOOKUPS)?;
    admission
        .times
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    let (mut agent, mut alone, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    let (mut done, mut round) = (0, 0);
    while done < o.lookups {
        let n = BATCH.min(o.lookups - done);
        for k in 0..3 {
            match (round + k) % 3 {
                0 => {
                    admission.on.store(true, Ordering::SeqCst);
                    agent.extend(lookups(Some(&job.ns_path), RESOLVER_ADDR, n)?);
                }
                1 => {
                    admission.on.store(false, Ordering::SeqCst);
                    alone.extend(lookups(Some(&job.ns_path), RESOLVER_ADDR, n)?);
                }
                _ => direct.extend(lookups(None, upstream.addr, n)?),
            }
        }
        done += n;
        round += 1;
    }
    if let Some(resolver) = b.resolver.take() {
        b.rt.block_on(resolver.shutdown());
    }
    // The same lookups through a resolver with the agent's defaults: after the first, each
    // is answered from the job's cache (and its pair, admitted long enough, costs nothing).
    let (udp, tcp) = run_in_netns(&job.ns_path, || {
        (
            std::net::UdpSocket::bind(RESOLVER_ADDR),
            std::net::TcpListener::bind(RESOLVER_ADDR),
        )
    })
    .map_err(|e| e.to_string())?;
    let (udp, tcp) = (udp.map_err(bind_err)?, tcp.map_err(bind_err)?);
    b.resolver = Some({
        let _enter = b.rt.enter();
        dns::serve(
            udp,
            tcp,
            DnsConfig::new(vec![upstream.addr]),
            allow,
            false,
            admitter(job.ns_path.clone(), admission.clone())?,
            events,
        )
        .map_err(|e| e.to_string())?
    });
    admission.on.store(true, Ordering::SeqCst);
    lookups(Some(&job.ns_path), RESOLVER_ADDR, WARM_UP_LOOKUPS)?;
    let mut cached = lookups(Some(&job.ns_path), RESOLVER_ADDR, o.lookups.min(400))?;
    if let Some(resolver) = b.resolver.take() {
        b.rt.block_on(resolver.shutdown());
    }
    let tally =
        b.rt.block_on(tally)
            .map_err(|e| format!("the event drain: {e}"))?;
    if !tally.unexpected.is_empty() {
        return Err(format!(
            "the resolver reported other than allowed answers of {host}: {}",
            tally.unexpected.join(", ")
        ));
    }
    let through_resolver = 2 * (o.lookups + WARM_UP_LOOKUPS) + WARM_UP_LOOKUPS + o.lookups.min(400);
    let mut admits =
        std::mem::take(&mut *admission.times.lock().unwrap_or_else(|p| p.into_inner()));
    // The cached lookups went through admission too.
    admits.truncate(o.lookups);
    if admits.len() != o.lookups {
        return Err(format!(
            "{} admissions for {} lookups with admission on",
            admits.len(),
            o.lookups
        ));
    }
    let agent_median = ms(percentile(&mut agent, 50));
    let agent_p99 = ms(percentile(&mut agent, 99));
    let alone_median = ms(percentile(&mut alone, 50));
    let alone_p99 = ms(percentile(&mut alone, 99));
    let direct_median = ms(percentile(&mut direct, 50));
    let direct_p99 = ms(percentile(&mut direct, 99));
    let cached_median = ms(percentile(&mut cached, 50));
    let cached_p99 = ms(percentile(&mut cached, 99));
    let admit_median = ms(percentile(&mut admits, 50));
    let admit_p99 = ms(percentile(&mut admits, 99));
    let overhead = agent_median - direct_median;
    println!(
        "dns, {} A lookups of {NAME} each, one after the other, interleaved in batches of {BATCH}:",
        o.lookups
    );
    println!(
        "  through the agent's resolver ({RESOLVER_ADDR} in the job's namespace; forwarded to the upstream, the answer admitted into the job's set before the reply): median {agent_median:.3} ms, p99 {agent_p99:.3} ms"
    );
    println!(
        "  through the resolver with the admission skipped (the resolver alone): median {alone_median:.3} ms, p99 {alone_p99:.3} ms"
    );
    println!(
        "  straight to the upstream ({}, from the host's namespace): median {direct_median:.3} ms, p99 {direct_p99:.3} ms",
        upstream.addr
    );
    println!(
        "  through the resolver with the agent's defaults, answered from the job's cache: median {cached_median:.3} ms, p99 {cached_p99:.3} ms ({} lookups)",
        cached.len()
    );
    println!(
        "  admission (the agent's hook, as the resolver waited for it: a netlink batch only when the pair is new or about to expire): median {admit_median:.3} ms, p99 {admit_p99:.3} ms"
    );
    println!(
        "dns: the agent adds {overhead:.3} ms to the median lookup ({:.3} ms without the admission); the resolver reported {} of {through_resolver} lookups as allowed with the test internet's address",
        alone_median - direct_median,
        tally.allowed
    );

    // What one admission costs when the agent must make it: a pair the set does not hold
    // yet (add), and one whose timeout it restarts (add, delete, add) — over the job's
    // netlink socket as the agent does, and with an `nft` process as the agent did before
    // (the reference).
    let sets = {
        let _enter = b.rt.enter();
        nftset::open_in_netns(&job.ns_path).map_err(|e| e.to_string())?
    };
    let (mut add_new, mut refresh, mut nft_add, mut nft_refresh) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..ADMISSION_SAMPLES {
        let addr: IpAddr = std::net::Ipv4Addr::new(198, 18, 7, i).into();
        for (times, again) in [(&mut add_new, false), (&mut refresh, true)] {
            let pair = nftset::Pair {
                addr,
                port: 443,
                timeout_secs: 600,
                refresh: again,
            };
            let start = Instant::now();
            b.rt.block_on(sets.admit(&[pair]))
                .map_err(|e| e.to_string())?;
            times.push(start.elapsed());
        }
        let pair = [(std::net::Ipv4Addr::new(198, 18, 8, i).into(), 443)];
        for (times, ruleset) in [
            (&mut nft_add, firewall::add_addresses(&pair, 600)),
            (&mut nft_refresh, firewall::admit_addresses(&pair, 600)),
        ] {
            let start = Instant::now();
            firewall::apply_in_netns(&job.ns_path, ruleset, "bench admission")
                .map_err(|e| e.to_string())?;
            times.push(start.elapsed());
        }
    }
    drop(sets);
    let add_new_median = ms(percentile(&mut add_new, 50));
    let refresh_median = ms(percentile(&mut refresh, 50));
    let nft_add_median = ms(percentile(&mut nft_add, 50));
    let nft_refresh_median = ms(percentile(&mut nft_refresh, 50));
    println!(
        "admission over netlink (the agent's): a new pair {add_new_median:.3} ms, restarting a pair's timeout {refresh_median:.3} ms (target < 0.3 ms each: {}); with an `nft` process (reference, as before): {nft_add_median:.3} ms and {nft_refresh_median:.3} ms (medians of {ADMISSION_SAMPLES}); the agent makes neither for an address it admitted for at least half the new TTL",
        verdict(add_new_median < 0.3 && refresh_median < 0.3)
    );

    b.finish()?;
    drop(b);
    drop(upstream);
    println!(
        "throughput_job_mibs={job_mibs:.0} throughput_ref_mibs={ref_mibs:.0} throughput_ratio={ratio:.3} dns_agent_median_ms={agent_median:.3} dns_agent_p99_ms={agent_p99:.3} dns_noadmit_median_ms={alone_median:.3} dns_noadmit_p99_ms={alone_p99:.3} dns_upstream_median_ms={direct_median:.3} dns_upstream_p99_ms={direct_p99:.3} dns_overhead_ms={overhead:.3} admit_median_ms={admit_median:.3} admit_p99_ms={admit_p99:.3} admit_new_pair_ms={add_new_median:.3} admit_refresh_ms={refresh_median:.3} nft_new_pair_ms={nft_add_median:.3} nft_refresh_ms={nft_refresh_median:.3} dns_cached_median_ms={cached_median:.3} dns_cached_p99_ms={cached_p99:.3}"
    );
    Ok(())
}
