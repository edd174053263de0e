//! Target `dns`: a job's resolver (`fuzzing::DnsResolver`) answering one query of the job,
//! with a fake policy, a fake admission hook and a fake upstream on loopback that answers
//! with bytes of the input — so the job-facing query parsing and answering, the parsing of
//! upstream replies and what is relayed of them are all fuzzed.
//!
//! Input: one flags byte (bit 0: the query came over TCP, else UDP; bit 1: audit mode;
//! bit 2: admission fails; bit 3: the upstream sends the input's reply bytes as they are
//! before the re-encoded form), a big-endian u16 length, the job's query, then the
//! upstream's reply. The upstream answers each query of the agent with, in turn: those
//! bytes with the query's ID; the same reply parsed and re-encoded with the query's ID,
//! header and question (when it parses); a SERVFAIL. The agent takes the first that answers
//! its query, so no input waits for a timeout.
//!
//! The policy allows `allowed.test`, `cdn.test` and every name under `wild.test`. The
//! resolvers here keep no answer cache and have no rate limits, so every input is answered
//! on its own and from the upstream: the cache and the per-job rates have their unit tests
//! in `egress/dns.rs` and the flood tests in `tests/tests/egress_flood.rs`.
//!
//! Properties, after every input:
//! - the upstream is only ever asked about host names the policy allows;
//! - admission is only asked for the queried name, allowed, with addresses the upstream
//!   sent and timeouts within the documented bounds;
//! - every address in the job's reply was admitted, and admitted successfully;
//! - a NOERROR or NXDOMAIN reply answers a name the policy allows;
//! - the reply keeps the query's ID, and a UDP reply fits the size the query allows;
//!   relayed TTLs are capped;
//! - the events report allowed (or audit) only for allowed names, with admitted addresses.

use crate::Seed;
use airlock::egress::dns::{
    AdmitFn, AllowFn, Answer, DnsConfig, DnsEvent, Verdict, MAX_TTL_SECS, MIN_TTL_SECS,
    TTL_GRACE_SECS,
};
use airlock::fuzzing::DnsResolver;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;

/// What the fake upstream answers with, and what it was asked.
#[derive(Debug, Default)]
struct Upstream {
    reply: Vec<u8>,
    raw_first: bool,
    asked: Vec<Query>,
    /// Every address in what it sent, as each message sent parses (the query's ID, patched
    /// in, can change how a compression pointer to the header reads).
    sent_ips: Vec<IpAddr>,
}

impl Upstream {
    fn sent(&mut self, message: &[u8]) {
        if let Ok(m) = Message::from_vec(message) {
            self.sent_ips.extend(ips(&m));
        }
    }
}

#[derive(Debug, Default)]
struct Admission {
    fail: bool,
    calls: Vec<Answer>,
}

struct Harness {
    rt: tokio::runtime::Runtime,
    resolver: DnsResolver,
    upstream: Arc<Mutex<Upstream>>,
    admission: Arc<Mutex<Admission>>,
    events: Mutex<mpsc::Receiver<DnsEvent>>,
    audit_resolver: DnsResolver,
}

/// The fake policy.
fn allowed(name: &str) -> bool {
    name == "allowed.test" || name == "cdn.test" || name.ends_with(".wild.test")
}

/// The name as a policy sees it (lowercase, no final dot), `None` when it is not a host name.
fn host_name(name: &Name) -> Option<String> {
    if name.is_root() {
        return None;
    }
    let mut labels = Vec::new();
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    Some(labels.join("."))
}

/// The upstream's answers to the agent's `query`, in the order they are sent.
fn replies_for(query: &Message, template: &[u8], raw_first: bool) -> Vec<Vec<u8>> {
    let mut raw = template.to_vec();
    if raw.len() >= 2 {
        raw[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
    }
    let structured = Message::from_vec(template).ok().and_then(|mut m| {
        m.metadata.id = query.metadata.id;
        m.metadata.message_type = MessageType::Response;
        m.metadata.op_code = OpCode::Query;
        m.queries = query.queries.clone();
        m.to_vec().ok()
    });
    let mut out = Vec::new();
    if raw_first {
        out.push(raw.clone());
    }
    out.extend(structured);
    if !raw_first {
        out.push(raw);
    }
    out
}

fn servfail(query: &Message) -> Vec<u8> {
    let mut m = Message::error_msg(query.metadata.id, OpCode::Query, ResponseCode::ServFail);
    m.add_queries(query.queries.clone());
    m.to_vec().expect("a SERVFAIL encodes")
}

async fn serve_udp(socket: UdpSocket, state: Arc<Mutex<Upstream>>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        let answers = {
            let mut s = state.lock().unwrap();
            s.asked.extend(query.queries.iter().cloned());
            let mut answers = replies_for(&query, &s.reply, s.raw_first);
            answers.push(servfail(&query));
            for a in &answers {
                s.sent(a);
            }
            answers
        };
        for a in answers {
            let _ = socket.send_to(&a, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<Mutex<Upstream>>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            continue;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).await.is_err() {
            continue;
        }
        let Ok(query) = Message::from_vec(&msg) else {
            continue;
        };
        let answer = {
            let mut s = state.lock().unwrap();
            s.asked.extend(query.queries.iter().cloned());
            let answer = replies_for(&query, &s.reply, s.raw_first)
                .into_iter()
                .next()
                .unwrap_or_else(|| servfail(&query));
            s.sent(&answer);
            answer
        };
        let Ok(n) = u16::try_from(answer.len()) else {
            continue;
        };
        let mut framed = n.to_be_bytes().to_vec();
        framed.extend(answer);
        let _ = stream.write_all(&framed).await;
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = crate::runtime();
        let upstream = Arc::new(Mutex::new(Upstream::default()));
        // One port for the upstream's UDP and TCP: bind UDP, then TCP on its port.
        let addr: SocketAddr = rt.block_on(async {
            loop {
                let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let addr = udp.local_addr().unwrap();
                if let Ok(tcp) = TcpListener::bind(addr).await {
                    tokio::spawn(serve_udp(udp, upstream.clone()));
                    tokio::spawn(serve_tcp(tcp, upstream.clone()));
                    break addr;
                }
            }
        });
        let admission = Arc::new(Mutex::new(Admission::default()));
        let admit: AdmitFn = {
            let admission = admission.clone();
            Arc::new(move |answer: Answer| {
                let mut a = admission.lock().unwrap();
                let fail = a.fail;
                a.calls.push(answer);
                Box::pin(async move {
                    if fail {
                        Err("the fake admission fails".to_string())
                    } else {
                        Ok(())
                    }
                })
            })
        };
        let allow: AllowFn = Arc::new(allowed);
        let mut cfg = DnsConfig::new(vec![addr]);
        cfg.timeout = Duration::from_secs(1);
        cfg.cache_entries = 0;
        let unlimited = airlock::egress::dns::Rate {
            per_second: u32::MAX / 2,
            burst: u32::MAX / 2,
        };
        cfg.query_rate = unlimited;
        cfg.upstream_rate = unlimited;
        let (tx, rx) = mpsc::channel(1024);
        let resolver =
            DnsResolver::new(cfg.clone(), allow.clone(), false, admit.clone(), tx.clone()).unwrap();
        let audit_resolver = DnsResolver::new(cfg, allow, true, admit, tx).unwrap();
        Harness {
            rt,
            resolver,
            upstream,
            admission,
            events: Mutex::new(rx),
            audit_resolver,
        }
    })
}

fn ips(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .chain(&m.authorities)
        .chain(&m.additionals)
        .filter_map(|r| r.data.ip_addr())
        .collect()
}

pub fn run(data: &[u8]) {
    let _ = exercise(data);
}

/// What one input got, for the self-test.
#[derive(Debug)]
struct Outcome {
    reply: Option<Message>,
    /// Questions the upstream was asked.
    asked: usize,
    admitted: Vec<IpAddr>,
}

fn exercise(data: &[u8]) -> Option<Outcome> {
    if data.len() < 3 {
        return None;
    }
    let flags = data[0];
    let (tcp, audit_mode, admit_fails, raw_first) = (
        flags & 1 != 0,
        flags & 2 != 0,
        flags & 4 != 0,
        flags & 8 != 0,
    );
    let len = usize::from(u16::from_be_bytes([data[1], data[2]]));
    let rest = &data[3..];
    let (query, reply) = rest.split_at(len.min(rest.len()));
    let h = harness();
    {
        let mut u = h.upstream.lock().unwrap();
        u.reply = reply.to_vec();
        u.raw_first = raw_first;
        u.asked.clear();
        u.sent_ips.clear();
    }
    {
        let mut a = h.admission.lock().unwrap();
        a.fail = admit_fails;
        a.calls.clear();
    }
    let resolver = if audit_mode {
        &h.audit_resolver
    } else {
        &h.resolver
    };
    let answer = h.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), resolver.answer(query, tcp))
            .await
            .expect("the resolver did not answer within 20 s")
    });

    let job_query = Message::from_vec(query).ok();
    let job_name = job_query
        .as_ref()
        .and_then(|q| q.queries.first())
        .and_then(|q| host_name(q.name()));

    let (asked, sent_ips) = {
        let mut u = h.upstream.lock().unwrap();
        (
            std::mem::take(&mut u.asked),
            std::mem::take(&mut u.sent_ips),
        )
    };
    for q in &asked {
        let name = host_name(q.name());
        assert!(
            name.as_deref().is_some_and(allowed),
            "the upstream was asked about {:?}, which the policy refuses",
            q.name()
        );
    }

    let calls = std::mem::take(&mut h.admission.lock().unwrap().calls);
    let mut admitted: Vec<IpAddr> = Vec::new();
    for call in &calls {
        assert!(
            allowed(&call.name),
            "admission for a refused name {:?}",
            call.name
        );
        assert_eq!(
            Some(&call.name),
            job_name.as_ref(),
            "admission for another name than the query's"
        );
        for &(ip, ttl) in &call.addrs {
            assert!(
                sent_ips.contains(&ip),
                "admitted {ip}, which the upstream never sent"
            );
            assert!(
                (MIN_TTL_SECS..=MAX_TTL_SECS + TTL_GRACE_SECS).contains(&ttl),
                "admitted {ip} for {ttl} s"
            );
            if !admit_fails {
                admitted.push(ip);
            }
        }
    }

    let mut parsed = None;
    if let Some(bytes) = &answer {
        if !tcp {
            let limit = job_query
                .as_ref()
                .and_then(|q| q.edns.as_ref())
                .map_or(512, |e| usize::from(e.max_payload().clamp(512, 4096)));
            assert!(
                bytes.len() <= limit,
                "a {} byte UDP reply, limit {limit}",
                bytes.len()
            );
        }
        let reply = Message::from_vec(bytes).expect("the resolver's reply parses");
        if bytes.len() >= 2 && query.len() >= 2 {
            assert_eq!(bytes[..2], query[..2], "the reply has another ID");
        }
        for r in &reply.answers {
            assert!(r.ttl <= MAX_TTL_SECS, "a TTL of {} relayed", r.ttl);
            if let Some(ip) = r.data.ip_addr() {
                assert!(
                    admitted.contains(&ip),
                    "{ip} released without being admitted"
                );
            }
        }
        if matches!(
            reply.metadata.response_code,
            ResponseCode::NoError | ResponseCode::NXDomain
        ) {
            assert!(
                job_name.as_deref().is_some_and(allowed),
                "answered {:?} ({}), which the policy refuses",
                job_query.as_ref().and_then(|q| q.queries.first()),
                reply.metadata.response_code
            );
        }
        parsed = Some(reply);
    }

    let mut events = h.events.lock().unwrap();
    while let Ok(e) = events.try_recv() {
        if matches!(e.verdict, Verdict::Allowed | Verdict::Audit) {
            assert!(allowed(&e.name), "event {e:?} allows a refused name");
            assert_eq!(e.verdict == Verdict::Audit, audit_mode, "event {e:?}");
        }
        for ip in &e.answers {
            assert!(
                admitted.contains(ip),
                "event {e:?} reports an address not admitted"
            );
        }
    }
    Some(Outcome {
        reply: parsed,
        asked: asked.len(),
        admitted,
    })
}

/// The seeds get what they were written for: the allowed name's own address only, after
/// admission; refusals that ask nobody; truncation; SERVFAIL when admission fails.
pub fn selftest() {
    let seeds = seeds();
    let run = |name: &str| exercise(&crate::seed(&seeds, name)).expect("seeds are long enough");
    let code = |o: &Outcome| o.reply.as_ref().map(|r| r.metadata.response_code);
    let ips = |o: &Outcome| -> Vec<IpAddr> {
        o.reply
            .as_ref()
            .map(|r| r.answers.iter().filter_map(|a| a.data.ip_addr()).collect())
            .unwrap_or_default()
    };
    let ten: IpAddr = Ipv4Addr::new(192, 0, 2, 10).into();
    for name in ["udp-a-allowed", "udp-a-allowed-raw"] {
        let o = run(name);
        assert_eq!(code(&o), Some(ResponseCode::NoError), "{name}: {o:?}");
        assert_eq!(ips(&o), [ten], "{name}: {o:?}");
        assert_eq!(o.admitted, [ten], "{name}: {o:?}");
    }
    let o = run("tcp-aaaa-cname-chain");
    assert_eq!(
        ips(&o),
        [IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))],
        "{o:?}"
    );
    let o = run("udp-nxdomain-soa");
    assert_eq!(code(&o), Some(ResponseCode::NXDomain), "{o:?}");
    let o = run("udp-big-reply-no-edns");
    assert!(
        o.reply.as_ref().is_some_and(|r| r.metadata.truncation),
        "{o:?}"
    );
    assert!(o.admitted.is_empty(), "{o:?}");
    assert_eq!(ips(&run("tcp-big-reply")).len(), 60);
    let o = run("admission-fails");
    assert_eq!(code(&o), Some(ResponseCode::ServFail), "{o:?}");
    for name in ["refused-name", "escaped-label"] {
        let o = run(name);
        assert_eq!(code(&o), Some(ResponseCode::Refused), "{name}: {o:?}");
        assert_eq!(o.asked, 0, "{name}: {o:?}");
    }
    for name in ["txt-stays-home", "any-rfc8482"] {
        let o = run(name);
        assert_eq!(
            (code(&o), o.asked),
            (Some(ResponseCode::NoError), 0),
            "{name}: {o:?}"
        );
    }
    assert_eq!(code(&run("two-questions")), Some(ResponseCode::FormErr));
    assert_eq!(code(&run("opcode-notify")), Some(ResponseCode::NotImp));
    assert_eq!(code(&run("class-chaos")), Some(ResponseCode::Refused));
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn query(qname: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::query();
    m.metadata.id = 0x1234;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m
}

fn response(qname: &str, qtype: RecordType, records: Vec<Record>) -> Message {
    let mut m = Message::response(0x1234, OpCode::Query);
    m.add_query(Query::query(name(qname), qtype));
    m.add_answers(records);
    m
}

fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(ip))))
}

fn input(flags: u8, query: &Message, reply: &[u8]) -> Vec<u8> {
    let q = query.to_vec().unwrap();
    let mut out = vec![flags];
    out.extend(u16::try_from(q.len()).unwrap().to_be_bytes());
    out.extend(q);
    out.extend(reply);
    out
}

pub fn seeds() -> Vec<Seed> {
    let simple = response(
        "allowed.test.",
        RecordType::A,
        vec![
            a("allowed.test.", 300, [192, 0, 2, 10]),
            a("other.test.", 300, [192, 0, 2, 66]),
        ],
    );
    let chain = response(
        "www.wild.test.",
        RecordType::AAAA,
        vec![
            Record::from_rdata(
                name("www.wild.test."),
                60,
                RData::CNAME(CNAME(name("edge.cdn.test."))),
            ),
            Record::from_rdata(
                name("edge.cdn.test."),
                86_400,
                RData::AAAA(AAAA(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))),
            ),
            a("edge.cdn.test.", 20, [198, 51, 100, 7]),
        ],
    );
    let mut nx = response("nothing.wild.test.", RecordType::A, Vec::new());
    nx.metadata.response_code = ResponseCode::NXDomain;
    nx.add_authority(Record::from_rdata(
        name("wild.test."),
        900,
        RData::SOA(SOA::new(
            name("ns.wild.test."),
            name("admin.wild.test."),
            1,
            2,
            3,
            4,
            60,
        )),
    ));
    let mut truncated = response("allowed.test.", RecordType::A, Vec::new());
    truncated.metadata.truncation = true;
    let many: Vec<Record> = (0..60u8)
        .map(|i| a("cdn.test.", 120, [203, 0, 113, i]))
        .collect();
    let big = response("cdn.test.", RecordType::A, many);
    let txt = response(
        "allowed.test.",
        RecordType::A,
        vec![Record::from_rdata(
            name("allowed.test."),
            60,
            RData::TXT(TXT::new(vec!["x".into()])),
        )],
    );
    let enc = |m: &Message| m.to_vec().unwrap();
    let mut two = query("allowed.test.", RecordType::A, false);
    two.add_query(Query::query(name("cdn.test."), RecordType::A));
    let mut notify = query("allowed.test.", RecordType::A, false);
    notify.metadata.op_code = OpCode::Notify;
    let mut edns1 = query("allowed.test.", RecordType::A, true);
    edns1.edns.as_mut().unwrap().set_version(1);
    let mut chaos = query("allowed.test.", RecordType::A, false);
    chaos.queries[0].set_query_class(DNSClass::CH);
    let escaped = {
        let mut m = query("allowed.test.", RecordType::A, false);
        m.queries[0].set_name(Name::from_labels(vec![&b"evil.allowed"[..], &b"test"[..]]).unwrap());
        m
    };
    vec![
        (
            "udp-a-allowed",
            input(
                0,
                &query("allowed.test.", RecordType::A, true),
                &enc(&simple),
            ),
        ),
        (
            "udp-a-allowed-raw",
            input(
                8,
                &query("allowed.test.", RecordType::A, false),
                &enc(&simple),
            ),
        ),
        (
            "tcp-aaaa-cname-chain",
            input(
                1,
                &query("www.wild.test.", RecordType::AAAA, true),
                &enc(&chain),
            ),
        ),
        (
            "udp-nxdomain-soa",
            input(
                0,
                &query("nothing.wild.test.", RecordType::A, false),
                &enc(&nx),
            ),
        ),
        (
            "udp-truncated-upstream",
            input(
                0,
                &query("allowed.test.", RecordType::A, false),
                &enc(&truncated),
            ),
        ),
        (
            "udp-big-reply-no-edns",
            input(0, &query("cdn.test.", RecordType::A, false), &enc(&big)),
        ),
        (
            "tcp-big-reply",
            input(1, &query("cdn.test.", RecordType::A, false), &enc(&big)),
        ),
        (
            "admission-fails",
            input(
                4,
                &query("allowed.test.", RecordType::A, false),
                &enc(&simple),
            ),
        ),
        (
            "audit-mode",
            input(
                2,
                &query("Allowed.Test.", RecordType::A, false),
                &enc(&simple),
            ),
        ),
        (
            "wrong-type-records",
            input(0, &query("allowed.test.", RecordType::A, false), &enc(&txt)),
        ),
        (
            "refused-name",
            input(0, &query("evil.test.", RecordType::A, false), &enc(&simple)),
        ),
        ("escaped-label", input(0, &escaped, &enc(&simple))),
        (
            "txt-stays-home",
            input(0, &query("allowed.test.", RecordType::TXT, false), b""),
        ),
        (
            "any-rfc8482",
            input(0, &query("x.wild.test.", RecordType::ANY, false), b""),
        ),
        (
            "cname-query",
            input(
                0,
                &query("www.wild.test.", RecordType::CNAME, false),
                &enc(&chain),
            ),
        ),
        ("two-questions", input(0, &two, b"")),
        ("opcode-notify", input(0, &notify, b"")),
        ("edns-version-1", input(0, &edns1, b"")),
        ("class-chaos", input(0, &chaos, b"")),
        (
            "garbage-after-header",
            input(
                0,
                &query("allowed.test.", RecordType::A, false),
                b"\x12\x34\x81\x80\x00\x01\x00\x01",
            ),
        ),
    ]
}
