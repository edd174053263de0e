//! A fake upstream resolver for the egress tests: UDP and TCP on one port of 127.0.0.1 (the
//! agent forwards from the host's namespace), answering from a fixed zone of A, AAAA and CNAME
//! records like a recursive resolver would (CNAME chains followed, NXDOMAIN for the rest).
//! It counts the queries it got per name, so a test can show a refused name was never
//! forwarded. Threads of its own; stops when dropped.

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{name}.")).expect("a valid test name")
}

/// The zone: built with [`Zone::a`] and [`Zone::cname`].
#[derive(Debug, Clone, Default)]
pub struct Zone {
    records: Vec<Record>,
    /// Names whose answers are held this long (the rest are answered at once).
    delays: HashMap<String, Duration>,
}

impl Zone {
    /// Holds every answer for `name` for `delay`.
    pub fn delay(mut self, name: &str, delay: Duration) -> Zone {
        self.delays.insert(name.to_string(), delay);
        self
    }

    fn delay_for(&self, query: &Message) -> Option<Duration> {
        let q = query.queries.first()?;
        let name = q.name().to_ascii().trim_end_matches('.').to_lowercase();
        self.delays.get(&name).copied()
    }

    pub fn a(mut self, name: &str, ip: Ipv4Addr, ttl: u32) -> Zone {
        self.records
            .push(Record::from_rdata(fqdn(name), ttl, RData::A(A(ip))));
        self
    }

    pub fn aaaa(mut self, name: &str, ip: Ipv6Addr, ttl: u32) -> Zone {
        self.records
            .push(Record::from_rdata(fqdn(name), ttl, RData::AAAA(AAAA(ip))));
        self
    }

    pub fn cname(mut self, name: &str, target: &str, ttl: u32) -> Zone {
        self.records.push(Record::from_rdata(
            fqdn(name),
            ttl,
            RData::CNAME(CNAME(fqdn(target))),
        ));
        self
    }

    fn answer(&self, query: &Message) -> Message {
        let mut reply = Message::response(query.id, OpCode::Query);
        reply.metadata.recursion_desired = query.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_queries(query.queries.iter().cloned());
        let Some(question) = query.queries.first() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return reply;
        };
        let mut owner = question.name().clone();
        let mut known = false;
        while let Some(alias) = self
            .records
            .iter()
            .find(|r| r.name == owner && r.record_type() == RecordType::CNAME)
        {
            known = true;
            reply.add_answer(alias.clone());
            let RData::CNAME(target) = &alias.data else {
                break;
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
        if !known {
            reply.metadata.response_code = ResponseCode::NXDomain;
        }
        reply
    }
}

/// The running fake resolver.
#[derive(Debug)]
pub struct FakeDns {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    queries: Arc<Mutex<HashMap<String, usize>>>,
    /// When each query arrived, with its name.
    log: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl FakeDns {
    pub fn start(zone: Zone) -> FakeDns {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").expect("a UDP port on loopback");
            let addr = udp.local_addr().expect("its address");
            if let Ok(tcp) = TcpListener::bind(addr) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let queries: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let log: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        tcp.set_nonblocking(true).expect("non-blocking listener");
        let zone = Arc::new(zone);
        let count = {
            let (queries, log) = (queries.clone(), log.clone());
            move |m: &Message| {
                if let Some(q) = m.queries.first() {
                    let name = q.name().to_ascii().trim_end_matches('.').to_lowercase();
                    *queries.lock().unwrap().entry(name.clone()).or_default() += 1;
                    log.lock().unwrap().push((Instant::now(), name));
                }
            }
        };
        {
            let (stop, zone, count) = (stop.clone(), zone.clone(), count.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, peer)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(query) = Message::from_vec(&buf[..len]) else {
                        continue;
                    };
                    count(&query);
                    let Ok(bytes) = zone.answer(&query).to_vec() else {
                        continue;
                    };
                    match (zone.delay_for(&query), udp.try_clone()) {
                        (Some(delay), Ok(sock)) => {
                            std::thread::spawn(move || {
                                std::thread::sleep(delay);
                                let _ = sock.send_to(&bytes, peer);
                            });
                        }
                        _ => {
                            let _ = udp.send_to(&bytes, peer);
                        }
                    }
                }
            });
        }
        {
            let (stop, zone) = (stop.clone(), zone.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut len = [0u8; 2];
                    while conn.read_exact(&mut len).is_ok() {
                        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if conn.read_exact(&mut msg).is_err() {
                            break;
                        }
                        let Ok(query) = Message::from_vec(&msg) else {
                            break;
                        };
                        count(&query);
                        let Ok(bytes) = zone.answer(&query).to_vec() else {
                            break;
                        };
                        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&bytes);
                        if conn.write_all(&out).is_err() {
                            break;
                        }
                    }
                }
            });
        }
        FakeDns {
            addr,
            stop,
            queries,
            log,
        }
    }

    /// When each query for a name ending in `suffix` arrived, in order.
    pub fn query_times(&self, suffix: &str) -> Vec<Instant> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(_, name)| name.ends_with(suffix))
            .map(|(at, _)| *at)
            .collect()
    }

    /// How many queries for `name` (lowercase, no trailing dot) reached this resolver.
    pub fn queries_for(&self, name: &str) -> usize {
        self.queries.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
