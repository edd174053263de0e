//! The agent's admission of answered addresses, end to end inside the agent (root; never
//! skipped): a job's namespace built by `NetManager` in egress mode, its resolver, admission
//! and audit started by `JobEgress::start` as `Sandboxes::prepare` does, a fake upstream on
//! the host's loopback, and "the internet" a namespace the test makes. Queries and
//! connections come from sockets made inside the job's namespace, as a job's would.
//!
//! - A failed netlink admission (the kernel refuses: the set is full) gives the job SERVFAIL,
//!   is audited, and leaves the address unreachable.
//! - A job cannot hold more admitted pairs than the bound: beyond it, SERVFAIL and audited.
//! - A name with a large fan-out (a new address on every answer, as S3 and CDNs give) keeps
//!   working for thousands of lookups, more than the bound, because old pairs expire.

use airlock::audit::AuditLog;
use airlock::egress::dns::{DnsConfig, Rate, RESOLVER_ADDR};
use airlock::egress::job::{JobEgress, MAX_ADMITTED_PAIRS};
use airlock::jobs::new_job_id;
use airlock::sandbox::firewall::EgressRules;
use airlock::sandbox::netns::{
    host_link_name, netns_name, run_in_netns, NetConfig, NetManager, NetMode,
};
use airlock_tests::internet::Internet;
use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn prerequisites() {
    airlock_tests::prereq::require_root_and(
        "the egress admission tests",
        &[("ip", "iproute2"), ("nft", "nftables")],
    );
}

/// Removes the job's objects with `ip`, whatever the code under test did.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &host_link_name(&self.0)])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &netns_name(&self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

/// A fake upstream on 127.0.0.1 (UDP) that answers every A query with what `answer` gives
/// for the query's number (0, 1, …): a list of addresses, TTL 0.
struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    queries: Arc<AtomicU32>,
}

impl Upstream {
    fn start(answer: impl Fn(u32) -> Vec<Ipv4Addr> + Send + 'static) -> Upstream {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU32::new(0));
        let (s, q) = (stop.clone(), queries.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                let n = q.fetch_add(1, Ordering::SeqCst);
                let mut reply = Message::response(query.id, OpCode::Query);
                reply.metadata.recursion_desired = query.recursion_desired;
                reply.metadata.recursion_available = true;
                reply.add_queries(query.queries.iter().cloned());
                if let Some(q) = query.queries.first() {
                    if q.query_type() == RecordType::A {
                        for ip in answer(n) {
                            reply.add_answer(Record::from_rdata(
                                q.name().clone(),
                                0,
                                RData::A(A(ip)),
                            ));
                        }
                    }
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), peer);
            }
        });
        Upstream {
            addr,
            stop,
            queries,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn policy(allow: &[&str]) -> airlock::policy::EgressPolicy {
    let list: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "[[rule]]\nname = \"t\"\n[rule.match]\nprovider = \"github\"\nrepository = \"acme/t\"\n\
         [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\n\
         [rule.egress]\nallow = [{}]\n",
        list.join(", ")
    );
    airlock::policy::load_str(Path::new("t.toml"), &text)
        .unwrap()
        .egress_for("t")
        .unwrap()
}

/// A UDP socket made inside the job's namespace, connected to its resolver.
fn resolver_socket(ns: &Path) -> UdpSocket {
    let socket = run_in_netns(ns, || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(RESOLVER_ADDR)?;
        Ok::<_, std::io::Error>(s)
    })
    .unwrap()
    .unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket
}

/// One A lookup through the job's resolver: the answer's code and addresses.
fn lookup(socket: &UdpSocket, name: &str) -> (ResponseCode, Vec<Ipv4Addr>) {
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).unwrap(),
        RecordType::A,
    ));
    // EDNS, so an answer of many addresses fits in one datagram.
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    q.set_edns(edns);
    socket.send(&q.to_vec().unwrap()).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let len = socket.recv(&mut buf).expect("the job's resolver answers");
        let reply = Message::from_vec(&buf[..len]).unwrap();
        if reply.id != q.id {
            continue;
        }
        let addrs = reply
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(ip),
                _ => None,
            })
            .collect();
        return (reply.response_code, addrs);
    }
}

/// A TCP connection from inside the job's namespace: the first line the server sent, or
/// the error.
fn connect_from(ns: &Path, to: SocketAddr) -> Result<String, std::io::ErrorKind> {
    run_in_netns(ns, move || {
        use std::io::{Read, Write};
        let mut s =
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).map_err(|e| e.kind())?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.kind())?;
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        Ok(body
            .rsplit("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .to_string())
    })
    .unwrap()
}

/// The elements of the job's `allowed4` set, as `nft` lists them.
fn set_elements(ns: &Path) -> usize {
    let out = run_in_netns(ns, || {
        Command::new("nft")
            .args(["-j", "list", "set", "inet", "airlock", "allowed4"])
            .output()
    })
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["set"]["elem"].as_array())
        .map(Vec::len)
        .sum()
}

fn nft_in(ns: &Path, script: String) {
    let out = run_in_netns(ns, move || {
        use std::io::Write;
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        child.wait_with_output()
    })
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn egress_dns_errors(audit: &Path) -> Vec<Value> {
    std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["event"] == "egress_dns" && r["verdict"] == "error")
        .collect()
}

struct Setup {
    mgr: NetManager,
    job: String,
    ns: std::path::PathBuf,
    audit_dir: tempfile::TempDir,
    audit: Arc<AuditLog>,
    _cleanup: Cleanup,
}

async fn setup(pool: &str) -> Setup {
    prerequisites();
    let mgr = NetManager::new(NetConfig {
        pool: pool.parse().unwrap(),
        ..NetConfig::default()
    })
    .unwrap();
    let job = new_job_id();
    let cleanup = Cleanup(job.clone());
    let net = mgr
        .create(
            &job,
            NetMode::Egress(EgressRules {
                audit: false,
                static_v4: vec![],
                static_v6: vec![],
                log_group: 1,
            }),
        )
        .await
        .unwrap();
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = Arc::new(AuditLog::open(&audit_dir.path().join("audit.jsonl")).unwrap());
    Setup {
        mgr,
        job,
        ns: net.ns_path,
        audit_dir,
        audit,
        _cleanup: cleanup,
    }
}

impl Setup {
    fn audit_path(&self) -> std::path::PathBuf {
        self.audit_dir.path().join("audit.jsonl")
    }

    async fn finish(self) {
        self.mgr.teardown(&self.job).await.unwrap();
        assert_eq!(self.mgr.verify_gone(&self.job).await.unwrap(), []);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_netlink_admission_is_servfail_audited_and_opens_nothing() {
    let s = setup("10.200.40.0/24").await;
    let internet = Internet::new([203, 0, 113]);
    let web = internet.serve(8080, "web");
    let host = internet.addr;
    let upstream = Upstream::start(move |_| vec![host]);
    let egress = JobEgress::start(
        &s.job,
        &s.ns,
        policy(&["web.test:8080"]),
        DnsConfig::new(vec![upstream.addr]),
        false,
        s.audit.clone(),
    )
    .await
    .unwrap();
    // The kernel's set is full: filled from outside the agent, which does not know it.
    let filler: Vec<String> = (0..MAX_ADMITTED_PAIRS)
        .map(|i| format!("198.18.{}.{} . 1", i / 256, i % 256))
        .collect();
    nft_in(
        &s.ns,
        format!(
            "add element inet airlock allowed4 {{ {} }}\n",
            filler.join(", ")
        ),
    );
    let socket = resolver_socket(&s.ns);
    let (code, addrs) = lookup(&socket, "web.test");
    assert_eq!(code, ResponseCode::ServFail);
    assert!(addrs.is_empty(), "no address released: {addrs:?}");
    assert_eq!(
        connect_from(&s.ns, web),
        Err(std::io::ErrorKind::HostUnreachable),
        "the address is not reachable after a failed admission"
    );
    // Room again: the same lookup is admitted and the address reachable, so it was the
    // failed admission that kept it closed.
    nft_in(&s.ns, "flush set inet airlock allowed4\n".into());
    let (code, addrs) = lookup(&socket, "web.test");
    assert_eq!((code, addrs), (ResponseCode::NoError, vec![host]));
    assert_eq!(
        connect_from(&s.ns, web),
        Ok(format!("web from {}", internet.host_addr))
    );
    drop(socket);
    egress.stop().await;
    s.audit.flush().await;
    let errors = egress_dns_errors(&s.audit_path());
    assert_eq!(errors.len(), 1, "{errors:?}");
    let reason = errors[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("admission") && reason.contains("the set is full"),
        "{reason}"
    );
    assert_eq!(errors[0]["name"], "web.test");
    assert_eq!(errors[0]["answers"], serde_json::json!([]));
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cannot_hold_more_admitted_pairs_than_the_bound() {
    let s = setup("10.200.41.0/24").await;
    // 64 new addresses in every answer (a TTL of 0 is still admitted for two minutes).
    let upstream = Upstream::start(|n| {
        (0..64u32)
            .map(|i| Ipv4Addr::from(0x0b00_0000 + n * 64 + i))
            .collect()
    });
    let mut cfg = DnsConfig::new(vec![upstream.addr]);
    cfg.upstream_rate = Rate {
        per_second: 1000,
        burst: 1000,
    };
    let egress = JobEgress::start(
        &s.job,
        &s.ns,
        policy(&["*.fanout.test:443"]),
        cfg,
        false,
        s.audit.clone(),
    )
    .await
    .unwrap();
    let socket = resolver_socket(&s.ns);
    let fits = MAX_ADMITTED_PAIRS / 64;
    for i in 0..fits {
        let (code, addrs) = lookup(&socket, &format!("b{i}.fanout.test"));
        assert_eq!(
            (code, addrs.len()),
            (ResponseCode::NoError, 64),
            "answer {i}"
        );
    }
    assert_eq!(set_elements(&s.ns), MAX_ADMITTED_PAIRS);
    for i in 0..5 {
        let (code, addrs) = lookup(&socket, &format!("over{i}.fanout.test"));
        assert_eq!(code, ResponseCode::ServFail, "beyond the bound");
        assert!(addrs.is_empty());
    }
    assert_eq!(set_elements(&s.ns), MAX_ADMITTED_PAIRS, "nothing beyond it");
    drop(socket);
    egress.stop().await;
    s.audit.flush().await;
    let errors = egress_dns_errors(&s.audit_path());
    assert_eq!(errors.len(), 5, "{errors:?}");
    for e in &errors {
        let reason = e["reason"].as_str().unwrap();
        assert!(
            reason.contains(&format!("limit of {MAX_ADMITTED_PAIRS}")),
            "{reason}"
        );
    }
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_a_large_fan_out_keeps_working_as_old_pairs_expire() {
    let s = setup("10.200.42.0/24").await;
    let internet = Internet::new([203, 0, 113]);
    let web = internet.serve(8080, "web");
    let host = internet.addr;
    // A new address on every answer, as S3 gives; every 1000th answer is the test
    // internet's server, so the job can show it still connects.
    let upstream = Upstream::start(move |n| {
        if n % 1000 == 999 {
            vec![host]
        } else {
            vec![Ipv4Addr::from(0x0b00_0000 + n)]
        }
    });
    let mut cfg = DnsConfig::new(vec![upstream.addr]);
    // Pairs expire after TTL 0 + 5 s of grace instead of two minutes; the lookups come
    // faster than the default upstream rate, to get through thousands in a test.
    cfg.min_admit_ttl = 2;
    cfg.upstream_rate = Rate {
        per_second: 1000,
        burst: 1000,
    };
    let egress = JobEgress::start(
        &s.job,
        &s.ns,
        policy(&["bucket.fanout.test:8080"]),
        cfg,
        false,
        s.audit.clone(),
    )
    .await
    .unwrap();
    let socket = resolver_socket(&s.ns);
    let lookups = MAX_ADMITTED_PAIRS as u32 + 400;
    let start = Instant::now();
    let mut peak = 0;
    for n in 0..lookups {
        // About 350 lookups a second: what is admitted at once stays well under the bound
        // (each pair is counted for its 5 s and 10 s more, until the kernel surely removed
        // it), while the lookups of the whole job go well over it.
        let due = start + Duration::from_secs_f64(f64::from(n) / 350.0);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let (code, addrs) = lookup(&socket, "bucket.fanout.test");
        assert_eq!(code, ResponseCode::NoError, "lookup {n}");
        assert_eq!(addrs.len(), 1, "lookup {n}");
        if addrs[0] == host {
            assert_eq!(
                connect_from(&s.ns, web),
                Ok(format!("web from {}", internet.host_addr)),
                "lookup {n}"
            );
        }
        if n % 1000 == 0 {
            peak = peak.max(set_elements(&s.ns));
        }
    }
    assert_eq!(upstream.queries.load(Ordering::SeqCst), lookups);
    assert!(
        peak > 0 && peak < MAX_ADMITTED_PAIRS / 2,
        "{peak} pairs in the set at once"
    );
    // Old pairs expire: the server's pair goes 5 s after its last answer.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(
        connect_from(&s.ns, web),
        Err(std::io::ErrorKind::HostUnreachable)
    );
    drop(socket);
    egress.stop().await;
    assert_eq!(egress_dns_errors(&s.audit_path()), Vec::<Value>::new());
    s.finish().await;
}
