//! Privileged tests of the NFLOG reader (root; they never skip: a missing prerequisite
//! fails with what is missing). Each test makes its own network namespaces, named
//! `alnf<random hex>` (never `airlock-*`: those belong to the agent), and a guard removes
//! them with `ip` even if the test fails. All traffic stays inside those namespaces: the
//! "internet" address 192.0.2.1 (TEST-NET-1) is on their own loopback, and the rules drop
//! what is sent to it before it gets there.

use airlock::egress::nflog::{
    open_in_netns, NflogError, NflogEvent, NflogReader, Proto, DEFAULT_GROUP,
};
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField, CT};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, Limit, Log, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::sync::mpsc;

fn prerequisites() {
    airlock_tests::prereq::require_root_and(
        "the NFLOG tests",
        &[
            ("ip", "iproute2"),
            ("python3", "python3"),
            ("nft", "nftables"),
        ],
    );
}

/// A network namespace of the test's own, with `lo` up and 192.0.2.2/24 on it (which makes
/// all of 192.0.2.0/24 local), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let ns = Netns {
            name: format!("alnf{:08x}", rand::random::<u32>()),
        };
        run("ip", &["netns", "add", &ns.name], None);
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"], None);
        run(
            "ip",
            &["-n", &ns.name, "addr", "add", "192.0.2.2/24", "dev", "lo"],
            None,
        );
        ns
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `cmd` inside the namespace, feeding it `stdin`; fails the test if it fails.
    fn exec(&self, cmd: &[&str], stdin: Option<&str>) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        run("ip", &args, stdin)
    }

    fn nft(&self, ruleset: &str) {
        self.exec(&["nft", "-f", "-"], Some(ruleset));
    }

    fn nft_json(&self, ruleset: &Nftables<'_>) {
        let json = serde_json::to_string(ruleset).unwrap();
        self.exec(&["nft", "-j", "-f", "-"], Some(&json));
    }

    /// Runs a Python program inside the namespace, without blocking the runtime.
    async fn python(&self, program: &str) -> String {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", program])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "python3 in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Packets counted by the `counter` of table `inet alnftest`'s output chain.
    fn counted(&self) -> u64 {
        let listing = self.exec(
            &["nft", "list", "chain", "inet", "alnftest", "output"],
            None,
        );
        let (_, after) = listing
            .split_once("counter packets ")
            .unwrap_or_else(|| panic!("no counter in {listing}"));
        after.split_whitespace().next().unwrap().parse().unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    pipe.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The job chain's two logging rules as the egress issue writes them: blocked attempts
/// (rate-limited; what is over the limit falls through to the plain drop after it) and, in
/// audit mode, new connections.
fn text_ruleset(group: u16) -> String {
    format!(
        r#"table inet alnftest {{
    chain output {{
        type filter hook output priority filter; policy accept;
        ip daddr 192.0.2.1 limit rate 20/second burst 40 packets log prefix "block" group {group} drop
        ip daddr 192.0.2.1 drop
        ip daddr 127.0.0.1 ct state new log prefix "conn" group {group} accept
    }}
}}
"#
    )
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Owned(protocol.to_string()),
            field: Cow::Owned(field.to_string()),
        },
    )))
}

fn is(left: Expression<'static>, right: Expression<'static>, op: Operator) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}

fn log(group: u16, prefix: &str) -> Statement<'static> {
    Statement::Log(Some(Log {
        prefix: Some(Cow::Owned(prefix.to_string())),
        ..Log::new(Some(u32::from(group)))
    }))
}

/// The same kind of rules as libnftables JSON built with the `nftables` crate, as the
/// agent's firewall applies them (`nft -j -f -`). `flood`: one unlimited, counted rule for
/// UDP to 192.0.2.1 instead.
fn json_ruleset(group: u16, flood: bool) -> Nftables<'static> {
    let table = "alnftest";
    let to_blocked = is(payload("ip", "daddr"), s("192.0.2.1"), Operator::EQ);
    let rules: Vec<Vec<Statement<'static>>> = if flood {
        vec![vec![
            to_blocked,
            is(payload("ip", "protocol"), s("udp"), Operator::EQ),
            Statement::Counter(Counter::Anonymous(None)),
            log(group, "flood"),
            Statement::Drop(None),
        ]]
    } else {
        vec![
            vec![
                to_blocked.clone(),
                Statement::Limit(Limit {
                    rate: 20,
                    rate_unit: None,
                    per: Some("second".into()),
                    burst: Some(40),
                    burst_unit: None,
                    inv: None,
                }),
                log(group, "block"),
                Statement::Drop(None),
            ],
            vec![to_blocked, Statement::Drop(None)],
            vec![
                is(payload("ip", "daddr"), s("127.0.0.1"), Operator::EQ),
                is(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "state".into(),
                        family: None,
                        dir: None,
                    })),
                    s("new"),
                    Operator::IN,
                ),
                log(group, "conn"),
                Statement::Accept(None),
            ],
        ]
    };
    let mut cmds = vec![
        NfCmd::Add(NfListObject::Table(Table {
            family: NfFamily::INet,
            name: table.into(),
            handle: None,
        })),
        NfCmd::Add(NfListObject::Chain(Chain {
            family: NfFamily::INet,
            table: table.into(),
            name: "output".into(),
            newname: None,
            handle: None,
            _type: Some(NfChainType::Filter),
            hook: Some(NfHook::Output),
            prio: Some(0),
            dev: None,
            policy: Some(NfChainPolicy::Accept),
        })),
    ];
    for expr in rules {
        cmds.push(NfCmd::Add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: table.into(),
            chain: "output".into(),
            expr: Cow::Owned(expr),
            handle: None,
            index: None,
            comment: None,
        })));
    }
    Nftables {
        objects: Cow::Owned(cmds.into_iter().map(NfObject::CmdObject).collect()),
    }
}

/// A blocked TCP connect, a blocked UDP datagram, and a connection on the namespace's own
/// loopback; prints the listener's port.
const TRAFFIC: &str = r#"
import socket
t = socket.socket()
t.settimeout(0.5)
try:
    t.connect(("192.0.2.1", 9))
except OSError:
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"q", ("192.0.2.1", 53))
except OSError:
    pass
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen()
port = l.getsockname()[1]
socket.create_connection(("127.0.0.1", port), timeout=2).close()
print(port)
"#;

/// `count` UDP datagrams to 192.0.2.1:`port` (each refused with EPERM by the drop).
fn udp_burst(port: u16, count: u32) -> String {
    format!(
        r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range({count}):
    try:
        u.sendto(b"x", ("192.0.2.1", {port}))
    except OSError:
        pass
"#
    )
}

/// Receives events until `done` holds for all received so far; fails the test after
/// `within`.
async fn collect(
    rx: &mut mpsc::Receiver<NflogEvent>,
    within: Duration,
    done: impl Fn(&[NflogEvent]) -> bool,
) -> Vec<NflogEvent> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(event)) => got.push(event),
            Ok(None) => panic!("the NFLOG reader stopped; events so far: {got:?}"),
            Err(_) => panic!("no further NFLOG event within {within:?}; events so far: {got:?}"),
        }
    }
    got
}

fn find<'a>(
    events: &'a [NflogEvent],
    prefix: &str,
    dst: &str,
    proto: Proto,
    dport: u16,
) -> Option<&'a NflogEvent> {
    let dst: IpAddr = dst.parse().unwrap();
    events
        .iter()
        .find(|e| e.prefix == prefix && e.dst == dst && e.proto == proto && e.dport == Some(dport))
}

fn open(ns: &Netns, capacity: usize) -> (NflogReader, mpsc::Receiver<NflogEvent>) {
    let (tx, rx) = mpsc::channel(capacity);
    let socket = open_in_netns(&ns.path(), DEFAULT_GROUP).expect("open the NFLOG socket");
    assert_eq!(socket.group(), DEFAULT_GROUP);
    (socket.spawn(tx), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_and_new_connections_are_reported_per_namespace() {
    prerequisites();
    // Two jobs' namespaces, the same group in both; one's rules written as nft text, the
    // other's as the JSON the agent applies.
    let a = Netns::new();
    a.nft(&text_ruleset(DEFAULT_GROUP));
    let b = Netns::new();
    b.nft_json(&json_ruleset(DEFAULT_GROUP, false));
    let (reader_a, mut rx_a) = open(&a, 64);
    let (reader_b, mut rx_b) = open(&b, 64);

    let theirs = udp_burst(5353, 1);
    let (port, _) = tokio::join!(a.python(TRAFFIC), b.python(&theirs));
    let port: u16 = port.trim().parse().unwrap();

    let events = collect(&mut rx_a, Duration::from_secs(10), |got| {
        find(got, "block", "192.0.2.1", Proto::Tcp, 9).is_some()
            && find(got, "block", "192.0.2.1", Proto::Udp, 53).is_some()
            && find(got, "conn", "127.0.0.1", Proto::Tcp, port).is_some()
    })
    .await;
    let tcp = find(&events, "block", "192.0.2.1", Proto::Tcp, 9).unwrap();
    assert_eq!(tcp.src, "192.0.2.2".parse::<IpAddr>().unwrap(), "{tcp:?}");
    assert!(tcp.sport.is_some_and(|p| p != 0), "{tcp:?}");
    let udp = find(&events, "block", "192.0.2.1", Proto::Udp, 53).unwrap();
    assert_eq!(udp.src, "192.0.2.2".parse::<IpAddr>().unwrap(), "{udp:?}");
    let conn = find(&events, "conn", "127.0.0.1", Proto::Tcp, port).unwrap();
    assert_eq!(conn.src, "127.0.0.1".parse::<IpAddr>().unwrap(), "{conn:?}");
    // Only the SYN of the accepted connection is new; nothing else of it is logged.
    // (A blocked SYN may be retried within the connect timeout, so "block" may repeat.)
    let conns = events.iter().filter(|e| e.prefix == "conn").count();
    assert_eq!(conns, 1, "{events:?}");

    let theirs = collect(&mut rx_b, Duration::from_secs(10), |got| {
        find(got, "block", "192.0.2.1", Proto::Udp, 5353).is_some()
    })
    .await;
    // Give anything that could leak across a flush interval, then look again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut late_a = Vec::new();
    while let Ok(e) = rx_a.try_recv() {
        late_a.push(e);
    }
    let mut late_b = Vec::new();
    while let Ok(e) = rx_b.try_recv() {
        late_b.push(e);
    }
    assert!(
        events.iter().chain(&late_a).all(|e| e.dport != Some(5353)),
        "B's packet reached A's socket: {events:?} {late_a:?}"
    );
    assert!(
        theirs
            .iter()
            .chain(&late_b)
            .all(|e| e.dport == Some(5353) && e.prefix == "block"),
        "A's packets reached B's socket: {theirs:?} {late_b:?}"
    );
    assert_eq!(reader_a.dropped(), 0);
    assert_eq!(reader_b.dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_has_one_socket_per_namespace() {
    prerequisites();
    let ns = Netns::new();
    let first = open_in_netns(&ns.path(), DEFAULT_GROUP).expect("the first socket binds");
    let err = open_in_netns(&ns.path(), DEFAULT_GROUP).expect_err("the group is taken");
    assert!(
        matches!(err, NflogError::GroupBusy { group, .. } if group == DEFAULT_GROUP),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("NFLOG group 1") && message.contains("held by another socket"),
        "{message}"
    );
    assert!(message.contains(&ns.name), "{message}");
    // Another group in the same namespace, and the same group in another namespace, are free.
    let other_group = open_in_netns(&ns.path(), DEFAULT_GROUP + 1).expect("another group");
    assert_eq!(other_group.group(), DEFAULT_GROUP + 1);
    let elsewhere = Netns::new();
    open_in_netns(&elsewhere.path(), DEFAULT_GROUP).expect("the same group elsewhere");
    // Closing the socket frees its group.
    drop(first);
    open_in_netns(&ns.path(), DEFAULT_GROUP).expect("the group is free again");
}

#[tokio::test]
async fn a_path_that_is_not_a_network_namespace_is_refused() {
    prerequisites();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-namespace");
    std::fs::write(&file, "").unwrap();
    let err = open_in_netns(&file, DEFAULT_GROUP).expect_err("a plain file");
    assert!(matches!(err, NflogError::Enter { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("is it a network namespace file?") && message.contains("not-a-namespace"),
        "{message}"
    );
    let missing = dir.path().join("missing");
    let err = open_in_netns(&missing, DEFAULT_GROUP).expect_err("a missing file");
    assert!(matches!(err, NflogError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn opening_needs_a_runtime() {
    prerequisites();
    let ns = Netns::new();
    let err = open_in_netns(&ns.path(), DEFAULT_GROUP).expect_err("no runtime");
    assert!(matches!(err, NflogError::NoRuntime), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_dropped_and_counted_without_blocking() {
    prerequisites();
    const FLOOD: u64 = 2000;
    const CAPACITY: usize = 16;
    let ns = Netns::new();
    ns.nft_json(&json_ruleset(DEFAULT_GROUP, true));
    let (reader, mut rx) = open(&ns, CAPACITY);

    // Nobody reads the channel during the flood.
    ns.python(&udp_burst(9, FLOOD as u32)).await;
    assert_eq!(ns.counted(), FLOOD, "the kernel logged every datagram");
    // The reader goes through all of it: it settles with the channel full and the rest
    // counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut last = u64::MAX;
    loop {
        let now = reader.dropped();
        if now == last && now > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader did not settle: {now} dropped"
        );
        last = now;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(rx.len(), CAPACITY);
    assert!(
        reader.dropped() >= FLOOD / 2,
        "only {} of {FLOOD} dropped with a channel of {CAPACITY}",
        reader.dropped()
    );
    let mut received = 0u64;
    while let Ok(e) = rx.try_recv() {
        assert_eq!(
            (e.prefix.as_str(), e.proto, e.dport),
            ("flood", Proto::Udp, Some(9))
        );
        received += 1;
    }
    assert_eq!(received, CAPACITY as u64);

    // The reader still delivers: a marker gets through once there is room.
    let (more, markers) = through_marker(&ns, &mut rx).await;
    received += more;
    assert_eq!(ns.counted(), FLOOD + markers);
    assert_eq!(
        received + reader.dropped(),
        FLOOD + markers,
        "every logged packet is delivered or counted ({received} delivered, {} dropped)",
        reader.dropped()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_the_kernel_could_not_hand_over_are_counted() {
    prerequisites();
    // At least 92 bytes each (headers, prefix, sequence number, 29 bytes of packet), 30000
    // reports are more than the socket's 2 MiB receive buffer holds.
    const FLOOD: u64 = 30_000;
    let ns = Netns::new();
    ns.nft_json(&json_ruleset(DEFAULT_GROUP, true));
    let (tx, mut rx) = mpsc::channel(2 * FLOOD as usize);
    let socket = open_in_netns(&ns.path(), DEFAULT_GROUP).expect("open the NFLOG socket");
    // Nobody reads the socket during the flood: the kernel drops what does not fit.
    ns.python(&udp_burst(9, FLOOD as u32)).await;
    assert_eq!(ns.counted(), FLOOD);
    let reader = socket.spawn(tx);
    let (received, markers) = through_marker(&ns, &mut rx).await;
    assert_eq!(ns.counted(), FLOOD + markers);
    assert!(
        reader.dropped() > 0 && received > 0,
        "{received} delivered, {} dropped",
        reader.dropped()
    );
    assert_eq!(
        received + reader.dropped(),
        FLOOD + markers,
        "every logged packet is delivered or counted ({received} delivered, {} dropped)",
        reader.dropped()
    );
}

/// Sends marker datagrams (UDP to 192.0.2.1:10) until one comes through `rx`, and returns
/// the events received on the way and the markers sent. Once a marker is read, every
/// report logged before it has been delivered or counted as dropped: its sequence number
/// accounts for those the kernel could not hand over.
async fn through_marker(ns: &Netns, rx: &mut mpsc::Receiver<NflogEvent>) -> (u64, u64) {
    let mut received = 0;
    let mut markers = 0;
    loop {
        assert!(markers < 10, "no marker came through after {markers}");
        ns.python(&udp_burst(10, 1)).await;
        markers += 1;
        let wait = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(e)) = tokio::time::timeout_at(wait, rx.recv()).await {
            received += 1;
            if e.dport == Some(10) {
                return (received, markers);
            }
        }
    }
}
