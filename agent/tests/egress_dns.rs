//! The job's resolver against a fake upstream resolver on 127.0.0.1, written here with
//! hickory-proto: it answers from configured records (following CNAME chains as a recursive
//! resolver does), counts the queries it sees and how many it holds at once, and can answer
//! UDP with TC=1. No root: the "job-facing" sockets are bound on 127.0.0.1 as well.

use airlock::egress::dns::{
    admit_ttl, serve, time_lookups, AdmitFn, AllowFn, Answer, DnsConfig, DnsEvent, DnsServer,
    Verdict, MAX_TTL_SECS, MIN_TTL_SECS, TTL_GRACE_SECS,
};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(5);

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{name}.")).unwrap()
}

/// The records a fake upstream answers from.
#[derive(Default, Clone)]
struct Zone {
    records: Vec<Record>,
    /// Added to every answer: a record of another name, which the job must never see.
    stray: Option<Record>,
    /// UDP answers carry TC=1 and no records; TCP answers are whole.
    truncate_udp: bool,
    /// How long each query is held before it is answered.
    delay: Duration,
}

impl Zone {
    fn a(mut self, name: &str, ip: &str, ttl: u32) -> Zone {
        let ip = ip.parse().unwrap();
        self.records
            .push(Record::from_rdata(fqdn(name), ttl, RData::A(A(ip))));
        self
    }

    fn aaaa(mut self, name: &str, ip: &str, ttl: u32) -> Zone {
        let ip = ip.parse().unwrap();
        self.records
            .push(Record::from_rdata(fqdn(name), ttl, RData::AAAA(AAAA(ip))));
        self
    }

    fn cname(mut self, name: &str, target: &str, ttl: u32) -> Zone {
        self.records.push(Record::from_rdata(
            fqdn(name),
            ttl,
            RData::CNAME(CNAME(fqdn(target))),
        ));
        self
    }

    /// What a recursive resolver would answer.
    fn answer(&self, query: &Message, over_udp: bool) -> Message {
        let mut reply = Message::response(query.id, OpCode::Query);
        reply.metadata.recursion_desired = query.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_queries(query.queries.iter().cloned());
        if over_udp && self.truncate_udp {
            reply.metadata.truncation = true;
            return reply;
        }
        let question = &query.queries[0];
        let mut owner = question.name().clone();
        let mut known = false;
        while let Some(alias) = self
            .records
            .iter()
            .find(|r| r.name == owner && r.record_type() == RecordType::CNAME)
        {
            known = true;
            reply.add_answer(alias.clone());
            if question.query_type() == RecordType::CNAME {
                return reply;
            }
            let RData::CNAME(target) = &alias.data else {
                unreachable!()
            };
            owner = target.0.clone();
        }
        known |= self.records.iter().any(|r| r.name == owner);
        reply.add_answers(
            self.records
                .iter()
                .filter(|r| r.name == owner && r.record_type() == question.query_type())
                .cloned(),
        );
        if let Some(stray) = &self.stray {
            reply.add_answer(stray.clone());
        }
        if !known {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply
    }
}

#[derive(Default)]
struct Counters {
    udp: AtomicUsize,
    tcp: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
    /// Each query's name (lowercase, no trailing dot) and when it arrived.
    log: Mutex<Vec<(Instant, String)>>,
}

impl Counters {
    fn record(&self, query: &Message) {
        let name = query.queries[0]
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_lowercase();
        self.log.lock().unwrap().push((Instant::now(), name));
    }
}

/// A fake upstream resolver on 127.0.0.1, UDP and TCP on the same port.
struct Upstream {
    addr: SocketAddr,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Upstream {
    async fn start(zone: Zone) -> Upstream {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (Arc::new(udp), tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let zone = Arc::new(zone);
        let udp_task = {
            let (zone, counters) = (zone.clone(), counters.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    let (len, peer) = udp.recv_from(&mut buf).await.unwrap();
                    let query = Message::from_vec(&buf[..len]).unwrap();
                    counters.udp.fetch_add(1, Ordering::SeqCst);
                    counters.record(&query);
                    let (zone, counters, udp) = (zone.clone(), counters.clone(), udp.clone());
                    tokio::spawn(async move {
                        let reply = hold(&zone, &counters, &query, true).await;
                        udp.send_to(&reply.to_vec().unwrap(), peer).await.unwrap();
                    });
                }
            })
        };
        let tcp_task = {
            let (zone, counters) = (zone.clone(), counters.clone());
            tokio::spawn(async move {
                loop {
                    let (mut stream, _) = tcp.accept().await.unwrap();
                    let (zone, counters) = (zone.clone(), counters.clone());
                    tokio::spawn(async move {
                        while let Some(query) = read_framed(&mut stream).await {
                            let query = Message::from_vec(&query).unwrap();
                            counters.tcp.fetch_add(1, Ordering::SeqCst);
                            counters.record(&query);
                            let reply = hold(&zone, &counters, &query, false).await;
                            write_framed(&mut stream, &reply.to_vec().unwrap()).await;
                        }
                    });
                }
            })
        };
        Upstream {
            addr,
            counters,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn udp_queries(&self) -> usize {
        self.counters.udp.load(Ordering::SeqCst)
    }

    fn tcp_queries(&self) -> usize {
        self.counters.tcp.load(Ordering::SeqCst)
    }

    fn queries(&self) -> usize {
        self.udp_queries() + self.tcp_queries()
    }
}

/// Answers after the zone's delay, counting the queries held at once.
async fn hold(zone: &Zone, counters: &Counters, query: &Message, over_udp: bool) -> Message {
    let now = counters.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    counters.peak.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(zone.delay).await;
    counters.in_flight.fetch_sub(1, Ordering::SeqCst);
    zone.answer(query, over_udp)
}

async fn read_framed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.ok()?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await.ok()?;
    Some(message)
}

async fn write_framed(stream: &mut TcpStream, message: &[u8]) {
    let mut framed = u16::try_from(message.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await.unwrap();
}

/// An upstream that never answers: a bound UDP socket nobody reads.
fn silent_upstream() -> StdUdpSocket {
    StdUdpSocket::bind("127.0.0.1:0").unwrap()
}

enum Admission {
    Immediate,
    Delayed(Duration),
    Fails,
}

/// One job's resolver on 127.0.0.1, with what its hooks saw.
struct Job {
    udp: SocketAddr,
    tcp: SocketAddr,
    server: DnsServer,
    events: mpsc::Receiver<DnsEvent>,
    /// Each admitted answer, with the moment admission finished.
    admitted: Arc<Mutex<Vec<(Answer, Instant)>>>,
    /// The names the policy was asked about.
    asked: Arc<Mutex<Vec<String>>>,
}

impl Job {
    fn start(cfg: DnsConfig, allowed: &[&str], audit_mode: bool, admission: Admission) -> Job {
        let udp = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let allow: AllowFn = {
            let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
            let asked = asked.clone();
            Arc::new(move |name: &str| {
                asked.lock().unwrap().push(name.to_string());
                // `*.suffix` allows the names under it, as a policy's wildcard does.
                audit_mode
                    || allowed.iter().any(|a| match a.strip_prefix("*.") {
                        Some(suffix) => name.ends_with(&format!(".{suffix}")),
                        None => a == name,
                    })
            })
        };
        let admitted = Arc::new(Mutex::new(Vec::new()));
        let admit: AdmitFn = {
            let admitted = admitted.clone();
            let delay = match admission {
                Admission::Immediate | Admission::Fails => Duration::ZERO,
                Admission::Delayed(delay) => delay,
            };
            let fails = matches!(admission, Admission::Fails);
            Arc::new(move |answer: Answer| {
                let admitted = admitted.clone();
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    if fails {
                        return Err("nft: set is full".to_string());
                    }
                    admitted.lock().unwrap().push((answer, Instant::now()));
                    Ok(())
                })
            })
        };
        let (events_tx, events) = mpsc::channel(4096);
        let server = serve(udp, tcp, cfg, allow, audit_mode, admit, events_tx).unwrap();
        Job {
            udp: udp_addr,
            tcp: tcp_addr,
            server,
            events,
            admitted,
            asked,
        }
    }

    fn events(&mut self) -> Vec<DnsEvent> {
        let mut events = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            events.push(event);
        }
        events
    }

    fn admitted(&self) -> Vec<Answer> {
        let admitted = self.admitted.lock().unwrap();
        admitted.iter().map(|(answer, _)| answer.clone()).collect()
    }
}

/// The default configuration without the cache, so that every allowed A, AAAA or CNAME query
/// reaches the upstream (the cache has tests of its own below).
fn config(upstreams: &[SocketAddr]) -> DnsConfig {
    let mut cfg = DnsConfig::new(upstreams.to_vec());
    cfg.cache_entries = 0;
    cfg
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

/// Sends one query over UDP; the reply, checked to be a reply to it, and when it arrived.
async fn ask_udp(server: SocketAddr, message: &Message) -> (Message, Instant) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(server).await.unwrap();
    socket.send(&message.to_vec().unwrap()).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let len = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("no reply over UDP")
        .unwrap();
    let received = Instant::now();
    let reply = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(reply.id, message.id);
    assert_eq!(reply.message_type, MessageType::Response);
    (reply, received)
}

async fn ask_tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    write_framed(&mut stream, &message.to_vec().unwrap()).await;
    let reply = tokio::time::timeout(WAIT, read_framed(&mut stream))
        .await
        .expect("no reply over TCP")
        .expect("connection closed without a reply");
    let reply = Message::from_vec(&reply).unwrap();
    assert_eq!(reply.id, message.id);
    reply
}

fn addrs(reply: &Message) -> Vec<IpAddr> {
    reply
        .answers
        .iter()
        .filter_map(|r| r.data.ip_addr())
        .collect()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn example_zone() -> Zone {
    Zone::default()
        .a("api.example.com", "192.0.2.10", 300)
        .a("api.example.com", "192.0.2.11", 300)
        .aaaa("api.example.com", "2001:db8::10", 600)
        .a("evil.example.net", "198.51.100.66", 300)
}

#[tokio::test]
async fn allowed_name_is_answered_over_udp_and_tcp() {
    let upstream = Upstream::start(example_zone()).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    let v4 = ips(&["192.0.2.10", "192.0.2.11"]);
    let v6 = ips(&["2001:db8::10"]);

    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert!(reply.recursion_available && reply.recursion_desired);
    assert_eq!(reply.queries[0].name(), &fqdn("api.example.com"));
    assert_eq!(addrs(&reply), v4);
    assert!(reply.answers.iter().all(|r| r.ttl == 300));
    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::AAAA)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), v6);

    let reply = ask_tcp(job.tcp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), v4);
    let reply = ask_tcp(job.tcp, &query("api.example.com", RecordType::AAAA)).await;
    assert_eq!(addrs(&reply), v6);

    // The agent asks upstream over UDP whatever the job used.
    assert_eq!((upstream.udp_queries(), upstream.tcp_queries()), (4, 0));
    let with_ttl = |list: &[IpAddr], ttl| -> Vec<(IpAddr, u32)> {
        list.iter().map(|&ip| (ip, admit_ttl(ttl))).collect()
    };
    let expected: Vec<Answer> = [(&v4, 300), (&v6, 600), (&v4, 300), (&v6, 600)]
        .into_iter()
        .map(|(list, ttl)| Answer {
            name: "api.example.com".into(),
            addrs: with_ttl(list, ttl),
        })
        .collect();
    assert_eq!(job.admitted(), expected);
    assert_eq!(admit_ttl(300), 300 + TTL_GRACE_SECS);

    let events = job.events();
    assert_eq!(events.len(), 4);
    for (event, (qtype, answers, ttl)) in events.iter().zip([
        ("A", &v4, 300),
        ("AAAA", &v6, 600),
        ("A", &v4, 300),
        ("AAAA", &v6, 600),
    ]) {
        assert_eq!(event.name, "api.example.com");
        assert_eq!(event.qtype, qtype);
        assert_eq!(event.verdict, Verdict::Allowed);
        assert_eq!(&event.answers, answers);
        assert_eq!(event.ttl, Some(ttl));
    }
}

#[tokio::test]
async fn tcp_connection_carries_several_queries_and_closes_when_idle() {
    let upstream = Upstream::start(example_zone()).await;
    let mut cfg = config(&[upstream.addr]);
    cfg.tcp_idle_timeout = Duration::from_millis(300);
    let job = Job::start(cfg, &["api.example.com"], false, Admission::Immediate);

    let mut stream = TcpStream::connect(job.tcp).await.unwrap();
    let first = query("api.example.com", RecordType::A);
    let second = query("api.example.com", RecordType::AAAA);
    // Both before reading either: replies come back in order on the one connection.
    write_framed(&mut stream, &first.to_vec().unwrap()).await;
    write_framed(&mut stream, &second.to_vec().unwrap()).await;
    for (sent, expected) in [
        (&first, ips(&["192.0.2.10", "192.0.2.11"])),
        (&second, ips(&["2001:db8::10"])),
    ] {
        let reply = tokio::time::timeout(WAIT, read_framed(&mut stream))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.id, sent.id);
        assert_eq!(addrs(&reply), expected);
    }
    let idle = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, stream.read(&mut byte))
        .await
        .expect("an idle connection must be closed by the resolver");
    assert_eq!(read.unwrap(), 0, "closed, not answered");
    assert!(idle.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn disallowed_name_is_refused_without_forwarding() {
    let upstream = Upstream::start(example_zone()).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    let (reply, _) = ask_udp(job.udp, &query("evil.example.net", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::Refused);
    assert!(reply.answers.is_empty());
    assert_eq!(reply.queries[0].name(), &fqdn("evil.example.net"));
    let reply = ask_tcp(job.tcp, &query("evil.example.net", RecordType::AAAA)).await;
    assert_eq!(reply.response_code, ResponseCode::Refused);
    // Data in a label of a name not allowed goes nowhere either, whatever the type.
    let (reply, _) = ask_udp(
        job.udp,
        &query("c2VjcmV0.evil.example.net", RecordType::TXT),
    )
    .await;
    assert_eq!(reply.response_code, ResponseCode::Refused);
    // A suffix is not the name.
    let (reply, _) = ask_udp(job.udp, &query("x.api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::Refused);

    assert_eq!(upstream.queries(), 0);
    assert!(job.admitted().is_empty());
    let events = job.events();
    let seen: Vec<(&str, &str, &Verdict)> = events
        .iter()
        .map(|e| (e.name.as_str(), e.qtype.as_str(), &e.verdict))
        .collect();
    assert_eq!(
        seen,
        [
            ("evil.example.net", "A", &Verdict::Refused),
            ("evil.example.net", "AAAA", &Verdict::Refused),
            ("c2vjcmv0.evil.example.net", "TXT", &Verdict::Refused),
            ("x.api.example.com", "A", &Verdict::Refused),
        ]
    );
    assert!(events
        .iter()
        .all(|e| e.answers.is_empty() && e.ttl.is_none()));
}

#[tokio::test]
async fn names_are_matched_lowercase_without_the_trailing_dot() {
    let upstream = Upstream::start(example_zone()).await;
    let job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    for name in ["API.Example.COM.", "api.EXAMPLE.com"] {
        let (reply, _) = ask_udp(job.udp, &query(name, RecordType::A)).await;
        assert_eq!(reply.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addrs(&reply), ips(&["192.0.2.10", "192.0.2.11"]));
        // The question comes back as the job wrote it (resolvers using 0x20 check this).
        let echoed = reply.queries[0].name().to_ascii();
        assert_eq!(echoed.trim_end_matches('.'), name.trim_end_matches('.'));
    }
    assert_eq!(
        *job.asked.lock().unwrap(),
        ["api.example.com", "api.example.com"]
    );
    let admitted = job.admitted();
    assert_eq!(admitted.len(), 2);
    assert!(admitted.iter().all(|a| a.name == "api.example.com"));
}

#[tokio::test]
async fn cname_chain_to_an_unlisted_target_admits_the_final_addresses() {
    let mut zone = Zone::default()
        .cname("www.example.com", "cdn.example.net", 60)
        .cname("cdn.example.net", "edge.cdn.example.net", 30)
        .a("edge.cdn.example.net", "192.0.2.30", 20)
        .a("edge.cdn.example.net", "192.0.2.31", 20);
    zone.stray = Some(Record::from_rdata(
        fqdn("other.example.org"),
        300,
        RData::A(A("192.0.2.99".parse().unwrap())),
    ));
    let upstream = Upstream::start(zone).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["www.example.com"],
        false,
        Admission::Immediate,
    );
    let (reply, _) = ask_udp(job.udp, &query("www.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    let chain: Vec<(String, RecordType)> = reply
        .answers
        .iter()
        .map(|r| (r.name.to_ascii(), r.record_type()))
        .collect();
    assert_eq!(
        chain,
        [
            ("www.example.com.".to_string(), RecordType::CNAME),
            ("cdn.example.net.".to_string(), RecordType::CNAME),
            ("edge.cdn.example.net.".to_string(), RecordType::A),
            ("edge.cdn.example.net.".to_string(), RecordType::A),
        ]
    );
    // The stray record of another name is not relayed, so not every address it names needs
    // admitting.
    assert_eq!(addrs(&reply), ips(&["192.0.2.30", "192.0.2.31"]));
    assert_eq!(
        job.admitted(),
        [Answer {
            name: "www.example.com".into(),
            addrs: vec![
                ("192.0.2.30".parse().unwrap(), MIN_TTL_SECS),
                ("192.0.2.31".parse().unwrap(), MIN_TTL_SECS),
            ],
        }]
    );
    let events = job.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name, "www.example.com");
    assert_eq!(events[0].answers, ips(&["192.0.2.30", "192.0.2.31"]));
    assert_eq!(events[0].ttl, Some(20), "the smallest TTL of the chain");

    // The target is not allowed by itself: only as the allowed name's alias.
    let (reply, _) = ask_udp(job.udp, &query("edge.cdn.example.net", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::Refused);
    assert_eq!(upstream.queries(), 1);
}

#[tokio::test]
async fn disallowed_alias_of_an_allowed_name_is_refused() {
    let zone = Zone::default()
        .cname("alias.evil.test", "www.example.com", 300)
        .a("www.example.com", "192.0.2.40", 300);
    let upstream = Upstream::start(zone).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["www.example.com"],
        false,
        Admission::Immediate,
    );
    for qtype in [RecordType::A, RecordType::CNAME] {
        let (reply, _) = ask_udp(job.udp, &query("alias.evil.test", qtype)).await;
        assert_eq!(reply.response_code, ResponseCode::Refused);
    }
    assert_eq!(upstream.queries(), 0);
    assert!(job.admitted().is_empty());
    assert!(job
        .events()
        .iter()
        .all(|e| e.verdict == Verdict::Refused && e.name == "alias.evil.test"));
}

#[tokio::test]
async fn reply_is_released_only_after_admission() {
    let upstream = Upstream::start(example_zone()).await;
    let job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Delayed(Duration::from_millis(200)),
    );
    let sent = Instant::now();
    let (reply, received) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    let admitted_at = job
        .admitted
        .lock()
        .unwrap()
        .first()
        .map(|(_, at)| *at)
        .expect("the reply arrived before admission finished");
    assert!(
        received >= admitted_at,
        "the reply arrived before the addresses were admitted"
    );
    assert!(received - sent >= Duration::from_millis(200));

    let admitted_before = job.admitted().len();
    let reply = ask_tcp(job.tcp, &query("api.example.com", RecordType::AAAA)).await;
    let received = Instant::now();
    assert_eq!(reply.response_code, ResponseCode::NoError);
    let admitted = job.admitted.lock().unwrap();
    assert_eq!(admitted.len(), admitted_before + 1);
    assert!(received >= admitted[admitted_before].1);
}

#[tokio::test]
async fn failed_admission_is_servfail() {
    let upstream = Upstream::start(example_zone()).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Fails,
    );
    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::ServFail);
    assert!(reply.answers.is_empty());
    let reply = ask_tcp(job.tcp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::ServFail);
    assert!(reply.answers.is_empty());
    let events = job.events();
    assert_eq!(events.len(), 2);
    for event in events {
        let Verdict::Error(reason) = &event.verdict else {
            panic!("a failed admission must be an error: {event:?}");
        };
        assert!(reason.contains("nft: set is full"), "{reason}");
        assert!(event.answers.is_empty());
    }
}

#[tokio::test]
async fn silent_upstream_is_skipped_after_the_timeout() {
    let silent = silent_upstream();
    let upstream = Upstream::start(example_zone()).await;
    let mut cfg = config(&[silent.local_addr().unwrap(), upstream.addr]);
    cfg.timeout = Duration::from_millis(300);
    let job = Job::start(cfg, &["api.example.com"], false, Admission::Immediate);
    let sent = Instant::now();
    let (reply, received) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), ips(&["192.0.2.10", "192.0.2.11"]));
    assert!(received - sent >= Duration::from_millis(300));
    assert_eq!(upstream.queries(), 1);
}

#[tokio::test]
async fn no_answering_upstream_is_servfail_after_the_timeouts() {
    let (first, second) = (silent_upstream(), silent_upstream());
    let mut cfg = config(&[first.local_addr().unwrap(), second.local_addr().unwrap()]);
    cfg.timeout = Duration::from_millis(300);
    let mut job = Job::start(cfg, &["api.example.com"], false, Admission::Immediate);
    let sent = Instant::now();
    let (reply, received) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::ServFail);
    let waited = received - sent;
    assert!(
        waited >= Duration::from_millis(600) && waited < Duration::from_secs(3),
        "{waited:?}: each upstream gets the timeout once"
    );
    assert!(job.admitted().is_empty());
    let events = job.events();
    assert_eq!(events.len(), 1);
    let Verdict::Error(reason) = &events[0].verdict else {
        panic!("{events:?}");
    };
    assert!(reason.contains("no answer over UDP"), "{reason}");
}

#[tokio::test]
async fn truncated_udp_answer_is_asked_again_over_tcp() {
    let mut zone = example_zone();
    zone.truncate_udp = true;
    let upstream = Upstream::start(zone).await;
    let job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert!(!reply.truncation);
    assert_eq!(addrs(&reply), ips(&["192.0.2.10", "192.0.2.11"]));
    assert_eq!((upstream.udp_queries(), upstream.tcp_queries()), (1, 1));
    assert_eq!(job.admitted().len(), 1);
}

#[tokio::test]
async fn other_types_are_answered_without_asking_upstream() {
    let upstream = Upstream::start(example_zone()).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    for qtype in [
        RecordType::TXT,
        RecordType::HTTPS,
        RecordType::SVCB,
        RecordType::MX,
    ] {
        let (reply, _) = ask_udp(job.udp, &query("api.example.com", qtype)).await;
        assert_eq!(reply.response_code, ResponseCode::NoError, "{qtype}");
        assert!(reply.answers.is_empty(), "{qtype}: NODATA");
    }
    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::ANY)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert_eq!(reply.answers.len(), 1);
    let RData::HINFO(hinfo) = &reply.answers[0].data else {
        panic!("ANY is answered with RFC 8482's HINFO: {reply:?}");
    };
    assert_eq!(&*hinfo.cpu, b"RFC8482");

    assert_eq!(upstream.queries(), 0);
    assert!(job.admitted().is_empty());
    let qtypes: Vec<(String, Verdict)> = job
        .events()
        .into_iter()
        .map(|e| (e.qtype, e.verdict))
        .collect();
    let expected: Vec<(String, Verdict)> = ["TXT", "HTTPS", "SVCB", "MX", "ANY"]
        .iter()
        .map(|t| (t.to_string(), Verdict::Allowed))
        .collect();
    assert_eq!(qtypes, expected);
}

#[tokio::test]
async fn audit_mode_answers_every_name_and_says_so() {
    let upstream = Upstream::start(example_zone()).await;
    let mut job = Job::start(config(&[upstream.addr]), &[], true, Admission::Immediate);
    let (reply, _) = ask_udp(job.udp, &query("evil.example.net", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&reply), ips(&["198.51.100.66"]));
    let (reply, _) = ask_udp(job.udp, &query("nowhere.example.net", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NXDomain);
    let (reply, _) = ask_udp(job.udp, &query("evil.example.net", RecordType::TXT)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    assert!(reply.answers.is_empty());

    assert_eq!(
        job.admitted(),
        [Answer {
            name: "evil.example.net".into(),
            addrs: vec![("198.51.100.66".parse().unwrap(), admit_ttl(300))],
        }]
    );
    let events = job.events();
    let seen: Vec<(&str, &str, &Verdict, usize)> = events
        .iter()
        .map(|e| {
            (
                e.name.as_str(),
                e.qtype.as_str(),
                &e.verdict,
                e.answers.len(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("evil.example.net", "A", &Verdict::Audit, 1),
            ("nowhere.example.net", "A", &Verdict::Audit, 0),
            ("evil.example.net", "TXT", &Verdict::Audit, 0),
        ]
    );
}

#[tokio::test]
async fn ttls_are_capped_for_the_job_and_floored_for_the_set() {
    let zone = Zone::default()
        .a("long.example.com", "192.0.2.50", 86_400)
        .a("zero.example.com", "192.0.2.51", 0);
    let upstream = Upstream::start(zone).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["long.example.com", "zero.example.com"],
        false,
        Admission::Immediate,
    );
    let (reply, _) = ask_udp(job.udp, &query("long.example.com", RecordType::A)).await;
    assert_eq!(reply.answers[0].ttl, MAX_TTL_SECS);
    let (reply, _) = ask_udp(job.udp, &query("zero.example.com", RecordType::A)).await;
    assert_eq!(reply.answers[0].ttl, 0, "the job is told the real TTL");
    let ttls: Vec<u32> = job.admitted().iter().map(|a| a.addrs[0].1).collect();
    assert_eq!(ttls, [MAX_TTL_SECS + TTL_GRACE_SECS, MIN_TTL_SECS]);
    let events: Vec<Option<u32>> = job.events().iter().map(|e| e.ttl).collect();
    assert_eq!(events, [Some(MAX_TTL_SECS), Some(0)]);
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing() {
    let upstream = Upstream::start(example_zone()).await;
    let mut job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    // Two questions in one query.
    let mut two = query("api.example.com", RecordType::A);
    two.add_query(Query::query(fqdn("api.example.com"), RecordType::AAAA));
    let (reply, _) = ask_udp(job.udp, &two).await;
    assert_eq!(reply.response_code, ResponseCode::FormErr);
    let reply = ask_tcp(job.tcp, &two).await;
    assert_eq!(reply.response_code, ResponseCode::FormErr);

    // A header that promises a question the datagram does not hold.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(job.udp).await.unwrap();
    let mut cut = query("api.example.com", RecordType::A).to_vec().unwrap();
    cut.truncate(20);
    socket.send(&cut).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let len = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(reply.id, u16::from_be_bytes([cut[0], cut[1]]));
    assert_eq!(reply.response_code, ResponseCode::FormErr);

    // Too short for a header, and a response instead of a query: no reply at all, so the
    // next datagram the client gets answers the query after them.
    socket.send(b"\x12\x34\x01").await.unwrap();
    let mut response = query("api.example.com", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    socket.send(&response.to_vec().unwrap()).await.unwrap();
    let valid = query("api.example.com", RecordType::A);
    socket.send(&valid.to_vec().unwrap()).await.unwrap();
    let len = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(reply.id, valid.id);
    assert_eq!(reply.response_code, ResponseCode::NoError);

    assert_eq!(upstream.queries(), 1);
    let verdicts: Vec<&str> = job.events().iter().map(|e| e.verdict.as_str()).collect();
    assert_eq!(verdicts, ["error", "error", "error", "allowed"]);
}

#[tokio::test]
async fn a_flood_never_exceeds_max_in_flight_upstream() {
    let mut zone = example_zone();
    zone.delay = Duration::from_millis(50);
    let upstream = Upstream::start(zone).await;
    let mut cfg = config(&[upstream.addr]);
    cfg.max_in_flight = 8;
    let job = Job::start(cfg, &["api.example.com"], false, Admission::Immediate);

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(job.udp).await.unwrap();
    for _ in 0..1000 {
        let message = query("api.example.com", RecordType::A);
        socket.send(&message.to_vec().unwrap()).await.unwrap();
    }
    let mut answered = 0;
    let mut buf = vec![0u8; 4096];
    while let Ok(received) =
        tokio::time::timeout(Duration::from_millis(1500), socket.recv(&mut buf)).await
    {
        received.unwrap();
        answered += 1;
    }
    let peak = upstream.counters.peak.load(Ordering::SeqCst);
    assert!(
        peak <= 8,
        "{peak} queries upstream at once, more than max_in_flight"
    );
    assert_eq!(peak, 8, "the flood should have filled every slot");
    assert!(answered >= 8, "only {answered} answers");
    assert!(upstream.queries() <= 1000);

    // Still serving afterwards.
    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
}

#[tokio::test]
async fn shutdown_closes_the_jobs_sockets() {
    let upstream = Upstream::start(example_zone()).await;
    let job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    let mut open = TcpStream::connect(job.tcp).await.unwrap();
    let (reply, _) = ask_udp(job.udp, &query("api.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NoError);
    let (udp, tcp) = (job.udp, job.tcp);
    job.server.shutdown().await;
    // The addresses are free again, and the open connection is closed.
    StdUdpSocket::bind(udp).expect("the UDP socket is still open");
    StdTcpListener::bind(tcp).expect("the TCP listener is still open");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, open.read(&mut byte))
        .await
        .unwrap();
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn lookup_timing_against_the_resolver_and_the_upstream() {
    let upstream = Upstream::start(example_zone()).await;
    let job = Job::start(
        config(&[upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    let through_agent = time_lookups(job.udp, "api.example.com", 5, WAIT)
        .await
        .unwrap();
    let direct = time_lookups(upstream.addr, "api.example.com", 5, WAIT)
        .await
        .unwrap();
    assert_eq!((through_agent.len(), direct.len()), (5, 5));
    assert_eq!(upstream.queries(), 10);
    let refused = time_lookups(job.udp, "evil.example.net", 1, WAIT).await;
    assert!(refused.is_err(), "{refused:?}");
}

/// The most queries of names ending in `suffix` the upstream got in any one second.
fn busiest_second(upstream: &Upstream, suffix: &str) -> usize {
    let log = upstream.counters.log.lock().unwrap();
    let times: Vec<Instant> = log
        .iter()
        .filter(|(_, name)| name.ends_with(suffix))
        .map(|(at, _)| *at)
        .collect();
    times
        .iter()
        .map(|&start| {
            times
                .iter()
                .filter(|&&t| t >= start && t < start + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

fn upstream_queries_for(upstream: &Upstream, name: &str) -> usize {
    let log = upstream.counters.log.lock().unwrap();
    log.iter().filter(|(_, n)| n == name).count()
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl_and_told_their_remaining_ttl() {
    let zone = Zone::default().a("short.example.com", "192.0.2.70", 2).a(
        "zero.example.com",
        "192.0.2.71",
        0,
    );
    let upstream = Upstream::start(zone).await;
    let job = Job::start(
        DnsConfig::new(vec![upstream.addr]),
        &["short.example.com", "zero.example.com"],
        false,
        Admission::Immediate,
    );
    let (first, _) = ask_udp(job.udp, &query("short.example.com", RecordType::A)).await;
    assert_eq!(first.answers[0].ttl, 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Any case: the cache is keyed by the name as the policy sees it.
    let (second, _) = ask_udp(job.udp, &query("SHORT.example.com", RecordType::A)).await;
    assert_eq!(second.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&second), ips(&["192.0.2.70"]));
    assert_eq!(second.answers[0].ttl, 1, "the TTL left, not the one stored");
    assert_eq!(upstream_queries_for(&upstream, "short.example.com"), 1);
    // A cached answer goes through admission like a fresh one (which admits nothing when
    // the set holds the pair long enough).
    assert_eq!(job.admitted().len(), 2);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (third, _) = ask_udp(job.udp, &query("short.example.com", RecordType::A)).await;
    assert_eq!(third.answers[0].ttl, 2);
    assert_eq!(upstream_queries_for(&upstream, "short.example.com"), 2);
    // TTL 0 is never cached.
    for _ in 0..3 {
        let (reply, _) = ask_udp(job.udp, &query("zero.example.com", RecordType::A)).await;
        assert_eq!(addrs(&reply), ips(&["192.0.2.71"]));
    }
    assert_eq!(upstream_queries_for(&upstream, "zero.example.com"), 3);
    // Another type of the same name is another entry.
    ask_udp(job.udp, &query("short.example.com", RecordType::AAAA)).await;
    assert_eq!(upstream_queries_for(&upstream, "short.example.com"), 3);
}

#[tokio::test]
async fn the_cache_is_bounded_in_entries_and_bytes() {
    let mut zone = Zone::default();
    for i in 0..10 {
        zone = zone.a(
            &format!("n{i}.example.com"),
            &format!("192.0.2.{}", 100 + i),
            300,
        );
    }
    let upstream = Upstream::start(zone).await;
    let mut cfg = DnsConfig::new(vec![upstream.addr]);
    cfg.cache_entries = 4;
    let job = Job::start(cfg, &["*.example.com"], false, Admission::Immediate);
    for i in 0..10 {
        ask_udp(job.udp, &query(&format!("n{i}.example.com"), RecordType::A)).await;
    }
    assert_eq!(upstream.queries(), 10);
    // The four stored last are answered from the cache; the oldest were dropped for them.
    for i in 6..10 {
        ask_udp(job.udp, &query(&format!("n{i}.example.com"), RecordType::A)).await;
    }
    assert_eq!(upstream.queries(), 10);
    ask_udp(job.udp, &query("n0.example.com", RecordType::A)).await;
    assert_eq!(upstream.queries(), 11);

    // A byte budget smaller than one answer keeps nothing.
    let mut cfg = DnsConfig::new(vec![upstream.addr]);
    cfg.cache_bytes = 64;
    let job = Job::start(cfg, &["*.example.com"], false, Admission::Immediate);
    for _ in 0..3 {
        ask_udp(job.udp, &query("n1.example.com", RecordType::A)).await;
    }
    assert_eq!(upstream.queries(), 14);
}

#[tokio::test]
async fn beyond_the_upstream_rate_the_job_gets_servfail_and_nothing_is_forwarded() {
    let upstream = Upstream::start(Zone::default()).await;
    let mut cfg = DnsConfig::new(vec![upstream.addr]);
    cfg.upstream_rate = airlock::egress::dns::Rate {
        per_second: 2,
        burst: 3,
    };
    let mut job = Job::start(cfg, &["*.example.com"], false, Admission::Immediate);
    let mut codes = Vec::new();
    for i in 0..8 {
        let (reply, _) =
            ask_udp(job.udp, &query(&format!("r{i}.example.com"), RecordType::A)).await;
        codes.push(reply.response_code);
    }
    // The burst, perhaps one more token refilled meanwhile, then SERVFAIL.
    let answered = codes
        .iter()
        .filter(|&&c| c == ResponseCode::NXDomain)
        .count();
    assert!((3..=4).contains(&answered), "{codes:?}");
    assert_eq!(
        upstream.queries(),
        answered,
        "a limited query is never forwarded"
    );
    assert_eq!(codes.last(), Some(&ResponseCode::ServFail));
    let limited: Vec<DnsEvent> = job
        .events()
        .into_iter()
        .filter(|e| matches!(&e.verdict, Verdict::Error(r) if r.contains("rate limit")))
        .collect();
    assert_eq!(
        limited.len(),
        8 - answered,
        "each limited query is an error event"
    );
    // The rate refills.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (reply, _) = ask_udp(job.udp, &query("again.example.com", RecordType::A)).await;
    assert_eq!(reply.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn the_jobs_queries_are_read_at_the_query_rate() {
    let upstream = Upstream::start(example_zone()).await;
    let mut cfg = DnsConfig::new(vec![upstream.addr]);
    cfg.query_rate = airlock::egress::dns::Rate {
        per_second: 20,
        burst: 5,
    };
    let job = Job::start(cfg, &["api.example.com"], false, Admission::Immediate);
    let start = Instant::now();
    for _ in 0..25 {
        // Refused names cost the agent no upstream query, but they are paced all the same.
        let (reply, _) = ask_udp(job.udp, &query("evil.example.net", RecordType::A)).await;
        assert_eq!(reply.response_code, ResponseCode::Refused);
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "25 queries at 20/s after a burst of 5 took only {took:?}"
    );
    assert_eq!(upstream.queries(), 0);
}

/// An upstream that answers every query with bytes that are not a DNS reply.
async fn garbage_upstream() -> (SocketAddr, JoinHandle<()>) {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
            // The query's ID, then noise: it looks like an answer only to a careless reader.
            let mut junk = buf[..2.min(len)].to_vec();
            junk.extend_from_slice(&[0xff; 40]);
            let _ = udp.send_to(&junk, peer).await;
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_upstream_that_is_down_or_answers_garbage_gives_servfail_and_other_jobs_are_served() {
    let good = Upstream::start(example_zone()).await;
    let (garbage, _task) = garbage_upstream().await;
    // Down: nothing listens on the port any more, so the kernel answers "port unreachable".
    let down = StdUdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut faulty = Vec::new();
    for upstream in [garbage, down] {
        let mut cfg = config(&[upstream]);
        cfg.timeout = Duration::from_millis(500);
        faulty.push(Job::start(
            cfg,
            &["api.example.com"],
            false,
            Admission::Immediate,
        ));
    }
    let other = Job::start(
        config(&[good.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    // Both faulty jobs ask at once, while the other job keeps resolving.
    let asks: Vec<_> = faulty
        .iter()
        .map(|job| {
            let udp = job.udp;
            tokio::spawn(
                async move { ask_udp(udp, &query("api.example.com", RecordType::A)).await },
            )
        })
        .collect();
    for _ in 0..5 {
        let start = Instant::now();
        let (reply, _) = ask_udp(other.udp, &query("api.example.com", RecordType::A)).await;
        assert_eq!(reply.response_code, ResponseCode::NoError);
        assert!(
            start.elapsed() < Duration::from_millis(250),
            "{:?}",
            start.elapsed()
        );
    }
    for (job, ask) in faulty.iter_mut().zip(asks) {
        let (reply, _) = ask.await.unwrap();
        assert_eq!(reply.response_code, ResponseCode::ServFail);
        assert!(reply.answers.is_empty());
        assert!(
            job.admitted().is_empty(),
            "nothing admitted from a failed lookup"
        );
        let events = job.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(
            matches!(&events[0].verdict, Verdict::Error(r) if r.contains("UDP")),
            "{events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_name_flood_is_bounded_upstream_and_another_jobs_lookups_stay_fast() {
    // Every name under flood.test is answered NXDOMAIN; api.example.com with TTL 0, so each
    // of the quiet job's lookups goes upstream too.
    let upstream = Upstream::start(Zone::default().a("api.example.com", "192.0.2.10", 0)).await;
    let flooder = Job::start(
        DnsConfig::new(vec![upstream.addr]),
        &["*.flood.test"],
        false,
        Admission::Immediate,
    );
    let quiet = Job::start(
        DnsConfig::new(vec![upstream.addr]),
        &["api.example.com"],
        false,
        Admission::Immediate,
    );
    async fn timed(job: SocketAddr, n: usize) -> Vec<Duration> {
        let mut times = Vec::new();
        for _ in 0..n {
            let start = Instant::now();
            let (reply, _) = ask_udp(job, &query("api.example.com", RecordType::A)).await;
            assert_eq!(
                reply.response_code,
                ResponseCode::NoError,
                "the quiet job failed"
            );
            times.push(start.elapsed());
            // A job's own pace, well within its own upstream rate.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        times.sort();
        times
    }
    let quiet_alone = timed(quiet.udp, 30).await;

    let flood_for = Duration::from_secs(3);
    let target = flooder.udp;
    // The flood comes from a thread of its own, as a job's processes would (about 4,000
    // queries a second, eight times the query rate the agent reads a job's queries at).
    let flood = std::thread::spawn(move || {
        let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(target).unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < flood_for {
            let name = format!("{:016x}.flood.test", rand_label(sent));
            let _ = socket.send(&query(&name, RecordType::A).to_vec().unwrap());
            sent += 1;
            if sent.is_multiple_of(8) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sent
    });
    let quiet_flooded = timed(quiet.udp, 60).await;
    let sent = flood.join().unwrap();

    let p99 = |v: &[Duration]| v[(v.len() * 99).div_ceil(100) - 1];
    let busiest = busiest_second(&upstream, ".flood.test");
    let total: usize = upstream
        .counters
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| n.ends_with(".flood.test"))
        .count();
    let rate = airlock::egress::dns::DEFAULT_UPSTREAM_RATE;
    assert!(sent > 1000, "the flood sent only {sent} queries");
    assert!(
        busiest <= (rate.burst + rate.per_second) as usize,
        "{busiest} flood queries reached the upstream in one second"
    );
    assert!(
        total <= rate.burst as usize + rate.per_second as usize * 4,
        "{total} flood queries reached the upstream in {flood_for:?}"
    );
    assert!(
        p99(&quiet_flooded) <= (p99(&quiet_alone) * 3).max(Duration::from_millis(20)),
        "the quiet job's p99 went from {:?} to {:?} under the flood",
        p99(&quiet_alone),
        p99(&quiet_flooded)
    );
}

/// A pseudo-random 64-bit label for the flood (splitmix64 of the counter).
fn rand_label(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
