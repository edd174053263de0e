//! The egress firewall of a job's namespace, against the real kernel and `nft` (root; never
//! skipped). The job is a namespace built by `NetManager` in egress mode; "the internet" is
//! a namespace the test makes (`airlock_tests::internet`). Connections are made from inside
//! the job's namespace by a small Python probe, as any job process would.

use airlock::egress::nftset;
use airlock::jobs::new_job_id;
use airlock::sandbox::firewall::EgressRules;
use airlock::sandbox::netns::{host_link_name, netns_name, NetConfig, NetManager, NetMode};
use airlock_tests::internet::Internet;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Duration;

fn prerequisites() {
    airlock_tests::prereq::require_root_and(
        "the egress firewall tests",
        &[
            ("ip", "iproute2"),
            ("python3", "python3"),
            ("nft", "nftables"),
        ],
    );
}

/// Removes the job's objects with `ip`, whatever the code under test did.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for job in &self.0 {
            let _ = Command::new("ip")
                .args(["link", "del", &host_link_name(job)])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", &netns_name(job)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Connects (TCP, or UDP with a query-shaped datagram and a reply expected) to each target
/// and prints `ok <first line of the answer>` or `err <ERRNO>`.
const PROBE: &str = r#"
import errno, socket, sys
for target in sys.argv[1:]:
    proto, host, port = target.split(":")
    try:
        if proto == "tcp":
            s = socket.create_connection((host, int(port)), timeout=2)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = s.recv(4096)
            print("ok", data.split(b"\r\n\r\n", 1)[-1].decode())
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.connect((host, int(port)))
            s.send(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01")
            s.recv(512)
            print("ok udp")
    except socket.timeout:
        print("err TIMEOUT")
    except OSError as e:
        print("err", errno.errorcode.get(e.errno, str(e)))
"#;

fn probe(job: &str, targets: &[String]) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns_name(job), "python3", "-c", PROBE])
        .args(targets)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "probe: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert_eq!(lines.len(), targets.len(), "{stdout}");
    lines
}

/// Admits pairs as the agent does: one nf_tables batch through a socket made in the job's
/// namespace (`egress::nftset`), each pair's timeout restarted.
async fn admit(mgr_ns: &std::path::Path, pairs: &[(Ipv4Addr, u16)], ttl: u32) {
    let sets = nftset::open_in_netns(mgr_ns).unwrap();
    let pairs: Vec<nftset::Pair> = pairs
        .iter()
        .map(|&(a, port)| nftset::Pair {
            addr: a.into(),
            port,
            timeout_secs: ttl,
            refresh: true,
        })
        .collect();
    sets.admit(&pairs).await.unwrap();
}

fn config(pool: &str) -> NetConfig {
    NetConfig {
        pool: pool.parse().unwrap(),
        ..NetConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_mode_allows_only_admitted_pairs_until_they_expire() {
    prerequisites();
    let mgr = NetManager::new(config("10.200.24.0/24")).unwrap();
    let internet = Internet::new([203, 0, 113]);
    let web = internet.serve(8080, "web");
    let other = internet.serve(8081, "other");
    let fixed = internet.serve(8082, "fixed");
    let dns = internet.serve(53, "not a resolver");
    let job = new_job_id();
    let _cleanup = Cleanup(vec![job.clone()]);
    let rules = EgressRules {
        audit: false,
        static_v4: vec![(internet.addr, 32, 8082)],
        static_v6: vec![],
        log_group: 1,
    };
    let net = mgr.create(&job, NetMode::Egress(rules)).await.unwrap();
    assert_eq!(net.mode.to_string(), "egress-block");
    let t = |p: &str, a: std::net::SocketAddr| format!("{p}:{}:{}", a.ip(), a.port());
    let targets = [
        t("tcp", web),
        t("tcp", other),
        t("tcp", fixed),
        t("tcp", dns),
        t("udp", dns),
    ];
    let expect_refused = "err EHOSTUNREACH".to_string();
    // Nothing admitted yet: only the explicit CIDR entry passes.
    assert_eq!(
        probe(&job, &targets),
        [
            expect_refused.clone(),
            expect_refused.clone(),
            format!("ok fixed from {}", internet.host_addr),
            expect_refused.clone(),
            // A refused UDP datagram fails the send itself.
            "err EPERM".to_string(),
        ]
    );
    // The agent admits web:8080 (and, to show it does not help, port 53) for 3 s.
    admit(
        &net.ns_path,
        &[(internet.addr, 8080), (internet.addr, 53)],
        3,
    )
    .await;
    let got = probe(&job, &targets);
    assert_eq!(got[0], format!("ok web from {}", internet.host_addr));
    assert_eq!(
        got[1], expect_refused,
        "another port of an admitted address"
    );
    assert_eq!(got[3], expect_refused, "DNS to anything but the agent");
    assert_eq!(
        got[4], "err EPERM",
        "DNS over UDP to anything but the agent"
    );
    // After the TTL the pair is gone again.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        probe(&job, &targets[..1]),
        std::slice::from_ref(&expect_refused)
    );

    // Admitting a blocked range (an allowed name resolving to the metadata service or a
    // private address: DNS rebinding) opens nothing.
    admit(
        &net.ns_path,
        &[
            (Ipv4Addr::new(169, 254, 169, 253), 80),
            (net.subnet.unwrap().host_addr(), 80),
        ],
        30,
    )
    .await;
    let gw = net.subnet.unwrap().host_addr();
    assert_eq!(
        probe(
            &job,
            &["tcp:169.254.169.253:80".to_string(), format!("tcp:{gw}:80")]
        ),
        [expect_refused.clone(), expect_refused.clone()]
    );
    // Its own endpoint addresses are still its own (on lo): nothing listens in this test,
    // so the answer is a refusal by its own loopback, not the firewall's.
    assert_eq!(
        probe(&job, &["tcp:169.254.170.2:80".to_string()]),
        ["err ECONNREFUSED"]
    );
    // A flood is refused to the last packet: the log rules are rate-limited, the refusal
    // is not (an exceeded `limit` must not let a packet fall through to the policy).
    let flood = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns_name(&job),
            "python3",
            "-c",
            &format!(
                "import socket\nok = 0\nfor i in range(500):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    try:\n        s.sendto(b'x', ('{}', 9))\n        ok += 1\n    except OSError:\n        pass\nprint(ok)",
                internet.addr
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&flood.stdout).trim(),
        "0",
        "datagrams that left the job: {}",
        String::from_utf8_lossy(&flood.stderr)
    );
    // The blocked attempts were counted by the log rules.
    let table = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns_name(&job),
            "nft",
            "list",
            "table",
            "inet",
            "airlock",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("log prefix \"block\" group 1"), "{table}");

    mgr.teardown(&job).await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_allows_everything_but_the_blocked_ranges() {
    prerequisites();
    let mgr = NetManager::new(config("10.200.25.0/24")).unwrap();
    let internet = Internet::new([203, 0, 113]);
    let web = internet.serve(8090, "web");
    let job = new_job_id();
    let _cleanup = Cleanup(vec![job.clone()]);
    let rules = EgressRules {
        audit: true,
        static_v4: vec![],
        static_v6: vec![],
        log_group: 1,
    };
    let net = mgr.create(&job, NetMode::Egress(rules)).await.unwrap();
    assert_eq!(net.mode.to_string(), "egress-audit");
    let gw = net.subnet.unwrap().host_addr();
    let got = probe(
        &job,
        &[
            format!("tcp:{}:{}", web.ip(), web.port()),
            "tcp:169.254.169.253:80".to_string(),
            format!("tcp:{gw}:80"),
            "tcp:192.168.1.1:80".to_string(),
        ],
    );
    assert_eq!(
        got,
        [
            format!("ok web from {}", internet.host_addr),
            "err EHOSTUNREACH".to_string(),
            "err EHOSTUNREACH".to_string(),
            "err EHOSTUNREACH".to_string(),
        ]
    );
    mgr.teardown(&job).await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_new_connections_reach_the_agent_through_nflog() {
    prerequisites();
    let mgr = NetManager::new(config("10.200.26.0/24")).unwrap();
    let internet = Internet::new([203, 0, 113]);
    let web = internet.serve(8095, "web");
    let mut seen = Vec::new();
    for audit in [false, true] {
        let job = new_job_id();
        let _cleanup = Cleanup(vec![job.clone()]);
        let rules = EgressRules {
            audit,
            static_v4: vec![],
            static_v6: vec![],
            log_group: airlock::egress::nflog::DEFAULT_GROUP,
        };
        let net = mgr.create(&job, NetMode::Egress(rules)).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let reader = airlock::egress::nflog::open_in_netns(
            &net.ns_path,
            airlock::egress::nflog::DEFAULT_GROUP,
        )
        .unwrap()
        .spawn(tx);
        let target = format!("tcp:{}:{}", web.ip(), web.port());
        let job2 = job.clone();
        let got = tokio::task::spawn_blocking(move || probe(&job2, &[target]))
            .await
            .unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no NFLOG event (audit={audit}), probe said {got:?}"))
            .unwrap();
        assert_eq!(event.dst, std::net::IpAddr::V4(internet.addr));
        assert_eq!(event.dport, Some(web.port()));
        seen.push((audit, event.prefix.clone(), got[0].clone()));
        drop(reader);
        mgr.teardown(&job).await.unwrap();
        assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
    }
    assert_eq!(
        seen,
        [
            (false, "block".to_string(), "err EHOSTUNREACH".to_string()),
            (
                true,
                "conn".to_string(),
                format!("ok web from {}", internet.host_addr)
            ),
        ]
    );
}

/// A test link on the host holding `addr/32`, with a server on `addr:port`; removed on drop.
struct HostService {
    link: String,
}

impl HostService {
    fn start(addr: Ipv4Addr, port: u16) -> HostService {
        let link = format!("alte{:08x}", rand::random::<u32>());
        let ok = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(&[
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{link}p"),
        ]);
        ok(&["addr", "add", &format!("{addr}/32"), "dev", &link]);
        ok(&["link", "set", &link, "up"]);
        let listener = std::net::TcpListener::bind((addr, port)).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                use std::io::{Read, Write};
                let mut buf = [0u8; 512];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost service");
            }
        });
        HostService { link }
    }
}

impl Drop for HostService {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
    }
}

fn exceptions_on_host() -> String {
    let out = Command::new("nft")
        .args(["list", "set", "inet", "airlock", "exceptions"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_cidr_entry_reaches_a_private_address_on_the_host_and_goes_with_the_job() {
    prerequisites();
    let private = Ipv4Addr::new(10, 200, 31, 1 + rand::random::<u8>() % 250);
    let _service = HostService::start(private, 8443);
    let mgr = NetManager::new(config("10.200.30.0/24")).unwrap();
    let job = new_job_id();
    let _cleanup = Cleanup(vec![job.clone()]);
    let rules = EgressRules {
        audit: false,
        // The /32 is nested in the /24: only the wider one goes into the host's set.
        static_v4: vec![
            (Ipv4Addr::new(10, 200, 31, 0), 24, 8443),
            (private, 32, 8443),
        ],
        static_v6: vec![],
        log_group: 1,
    };
    let net = mgr.create(&job, NetMode::Egress(rules)).await.unwrap();
    let link = net.host_link.clone().unwrap();
    assert!(
        exceptions_on_host().contains(&link),
        "{}",
        exceptions_on_host()
    );
    let got = probe(
        &job,
        &[format!("tcp:{private}:8443"), format!("tcp:{private}:8444")],
    );
    assert_eq!(got, ["ok host service", "err EHOSTUNREACH"]);
    mgr.teardown(&job).await.unwrap();
    assert_eq!(mgr.verify_gone(&job).await.unwrap(), []);
    assert!(
        !exceptions_on_host().contains(&link),
        "{}",
        exceptions_on_host()
    );

    // An agent that crashes leaves its job's entries; the next one removes them at start
    // (their link is gone with the namespace), and leaves a live job's alone.
    let live = new_job_id();
    let crashed = new_job_id();
    let _cleanup2 = Cleanup(vec![live.clone(), crashed.clone()]);
    let rules = |port| EgressRules {
        audit: false,
        static_v4: vec![(private, 32, port)],
        static_v6: vec![],
        log_group: 1,
    };
    let live_net = mgr
        .create(&live, NetMode::Egress(rules(9001)))
        .await
        .unwrap();
    {
        let first = NetManager::new(config("10.200.32.0/24")).unwrap();
        let net = first
            .create(&crashed, NetMode::Egress(rules(9002)))
            .await
            .unwrap();
        let crashed_link = net.host_link.unwrap();
        assert!(exceptions_on_host().contains(&crashed_link));
        // The agent dies; its job's link and namespace go (as the kernel or a reboot would).
        let _ = Command::new("ip")
            .args(["link", "del", &crashed_link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &netns_name(&crashed)])
            .status();
        let next = NetManager::new(config("10.200.32.0/24")).unwrap();
        // At least this one (another test's crashed agent may have left some too).
        assert!(next.remove_stale_exceptions().await.unwrap() >= 1);
        let left = exceptions_on_host();
        assert!(!left.contains(&crashed_link), "{left}");
        assert!(
            left.contains(live_net.host_link.as_ref().unwrap()),
            "{left}"
        );
    }
    mgr.teardown(&live).await.unwrap();
    assert_eq!(mgr.verify_gone(&live).await.unwrap(), []);
}
