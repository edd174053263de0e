//! IPv6 for jobs, end to end (root): an agent with `[sandbox] ipv6_address_pool` gives its
//! outbound and egress jobs an IPv6 address beside the IPv4 one. The job reaches allowed
//! names over IPv6 (AAAA answers admitted into its `allowed6` set), and never the blocked
//! IPv6 ranges — AWS's metadata address `fd00:ec2::254`, NAT64 of the IPv4 metadata
//! address, link-local, other jobs — nor the host's own addresses. "The internet" is a
//! namespace the test makes, with 2001:db8::/32 addresses.

use airlock_tests::fakedns::{FakeDns, Zone};
use airlock_tests::internet::Internet;
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::net::{Ipv6Addr, TcpListener};

use airlock_tests::kv;

const POOL6: &str = "fd61:6972:6c6b::/96";

/// A Python probe run inside the job: for each `(label, host, port)` a TCP connect (and an
/// HTTP GET on success), printing `label=<status line body>` or `label=<errno name>`; and
/// `addrs=` the job's own IPv6 addresses. The host `@gateway` is the host's end of the
/// job's link.
fn probe(targets: &[(&str, String, u16)]) -> String {
    let list: Vec<String> = targets
        .iter()
        .map(|(label, host, port)| format!("(\"{label}\", \"{host}\", {port})"))
        .collect();
    format!(
        r#"python3 - <<'EOF'
import errno, ipaddress, socket
def own():
    try:
        return [l.split()[0] for l in open("/proc/net/if_inet6")]
    except OSError:
        return []
def gateway():
    # The host's end of the job's link: the job's address in the pool, minus one.
    mine = [a for a in own() if a.startswith("fd")][0]
    return str(ipaddress.IPv6Address(int(mine, 16) - 1))
for label, host, port in [{list}]:
    try:
        if host == "@gateway":
            host = gateway()
        infos = socket.getaddrinfo(host, port, socket.AF_INET6, socket.SOCK_STREAM)
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect(infos[0][4])
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = s.recv(4096).decode()
        print(label + "=" + reply.split("\r\n")[0].split(" ")[1] + " " + reply.split("\r\n\r\n", 1)[1])
    except socket.gaierror as e:
        print(label + "=NONAME")
    except socket.timeout:
        print(label + "=TIMEOUT")
    except OSError as e:
        print(label + "=" + errno.errorcode.get(e.errno, str(e)))
print("addrs=" + ",".join(own()))
EOF
"#,
        list = list.join(", ")
    )
}

/// Runs `script` as the production job; its `key=value` lines, and the context for
/// assertion messages (the job's output and the agent's log).
fn run_probe(stack: &Stack, script: &str) -> (std::collections::BTreeMap<String, String>, String) {
    let out = stack.run_sh(&GithubJob::production().token(), script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.agent.log()
    );
    assert!(out.status.success(), "{ctx}");
    (kv(&stdout), ctx)
}

fn records(stack: &Stack, event: &str) -> Vec<Value> {
    stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

/// The job's address in `/proc/net/if_inet6` form (32 hex digits) is inside [`POOL6`].
fn in_pool(if_inet6: &str) -> bool {
    if_inet6.len() == 32 && if_inet6.starts_with("fd6169726c6b0000000000000")
}

/// A listener on one of the host's own addresses (`::`: all of them): a job that could
/// reach the host itself would connect to it.
fn host_listener(addr: Ipv6Addr) -> (TcpListener, u16) {
    let l = TcpListener::bind((addr, 0)).expect("a listener on the host's IPv6 address");
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn with_an_ipv6_pool_an_egress_job_reaches_only_allowed_names_over_ipv6() {
    let web = Internet::new([198, 51, 100]);
    let elsewhere = Internet::new([198, 51, 100]);
    web.serve6(8080, "web6");
    web.serve6(8081, "web6-8081");
    elsewhere.serve6(8080, "elsewhere6");
    elsewhere.serve6(8082, "static6");
    let elsewhere_net = Ipv6Addr::from(u128::from(elsewhere.addr6) & !0xffff);
    let (_host, host_port) = host_listener(web.host_addr6);
    let (_any, any_port) = host_listener(Ipv6Addr::UNSPECIFIED);
    let zone = Zone::default()
        .aaaa("v6.test", web.addr6, 60)
        .aaaa("other6.test", elsewhere.addr6, 60)
        .aaaa("rebind6.test", "fd00:ec2::254".parse().unwrap(), 60);
    let dns = FakeDns::start(zone);
    let stack = Stack::sandboxed_production_tables(
        &format!(
            "ipv6_address_pool = \"{POOL6}\"\n[egress]\nupstreams = [\"{}\"]\n",
            dns.addr
        ),
        &format!(
            "[rule.egress]\nallow = [\"v6.test:8080\", \"rebind6.test:80\", \"[{elsewhere_net}/112]:8082\"]\n"
        ),
    );
    let script = probe(&[
        ("allowed", "v6.test".into(), 8080),
        ("other_port", "v6.test".into(), 8081),
        ("not_listed", "other6.test".into(), 8080),
        ("direct_ip", elsewhere.addr6.to_string(), 8080),
        ("static_cidr", elsewhere.addr6.to_string(), 8082),
        ("rebinding_to_metadata", "rebind6.test".into(), 80),
        ("metadata", "fd00:ec2::254".into(), 80),
        ("nat64_metadata", "64:ff9b::a9fe:a9fe".into(), 80),
        ("link_local", "fe80::1%eth0".into(), 80),
        ("host_itself", web.host_addr6.to_string(), host_port),
        ("gateway", "@gateway".into(), any_port),
    ]);
    let (k, ctx) = run_probe(&stack, &script);
    let get = |key: &str| k.get(key).map(String::as_str).unwrap_or("<missing>");
    // Masqueraded behind the host's address on the internet's link (NAT66).
    assert_eq!(
        get("allowed"),
        format!("200 web6 from {}", web.host_addr6),
        "{ctx}"
    );
    assert_eq!(
        get("static_cidr"),
        format!("200 static6 from {}", elsewhere.host_addr6),
        "{ctx}"
    );
    // Refused by the job's chain with "administratively prohibited" (EACCES for IPv6).
    for label in [
        "other_port",
        "direct_ip",
        "rebinding_to_metadata",
        "metadata",
        "nat64_metadata",
        "host_itself",
        "gateway",
    ] {
        assert_eq!(get(label), "EACCES", "{label}\n{ctx}");
    }
    // Refused too, but the refusal of a packet to a link-local address does not come
    // back to the job (the kernel sends no ICMPv6 error to a link-local source through
    // the refusal), so its connect runs into its timeout.
    assert!(matches!(get("link_local"), "EACCES" | "TIMEOUT"), "{ctx}");
    assert_eq!(get("not_listed"), "NONAME", "{ctx}");
    assert_eq!(dns.queries_for("other6.test"), 0, "{ctx}");
    let addrs: Vec<&str> = get("addrs").split(',').collect();
    assert!(addrs.iter().any(|a| in_pool(a)), "{ctx}");

    let blocked = records(&stack, "egress_blocked");
    assert!(
        blocked.iter().any(|r| r["dst"] == web.addr6.to_string()
            && r["port"] == 8081
            && r["proto"] == "tcp"
            && r["name"] == "v6.test"),
        "{blocked:?}"
    );
    assert!(
        blocked
            .iter()
            .any(|r| r["dst"] == "fd00:ec2::254" && r["port"] == 80),
        "{blocked:?}"
    );
    let started = records(&stack, "job_started");
    assert_eq!(
        started[0]["sandbox"]["network"], "egress-block",
        "{started:?}"
    );
    let addr6 = started[0]["sandbox"]["job_addr6"]
        .as_str()
        .unwrap_or_default();
    let addr6: Ipv6Addr = addr6
        .parse()
        .expect("job_started records the job's IPv6 address");
    assert!(
        in_pool(&format!("{:032x}", u128::from(addr6))),
        "{started:?}"
    );
    let wiped = records(&stack, "job_wiped");
    assert!(!wiped.is_empty());
    for r in wiped {
        assert_eq!(r["leftovers"], serde_json::json!([]), "{r}");
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding")
            .unwrap()
            .trim(),
        "1"
    );
}

#[test]
fn with_an_ipv6_pool_an_outbound_job_reaches_the_ipv6_internet_but_not_the_blocked_ranges() {
    let web = Internet::new([198, 51, 100]);
    web.serve6(8080, "web6");
    let (_host, host_port) = host_listener(web.host_addr6);
    let (_any, any_port) = host_listener(Ipv6Addr::UNSPECIFIED);
    let stack = Stack::sandboxed_outbound_production(&format!("ipv6_address_pool = \"{POOL6}\"\n"));
    let script = probe(&[
        ("internet", web.addr6.to_string(), 8080),
        ("metadata", "fd00:ec2::254".into(), 80),
        ("nat64_metadata", "64:ff9b::a9fe:a9fe".into(), 80),
        ("mapped_private", "::ffff:10.0.0.1".into(), 80),
        ("sixtofour_metadata", "2002:a9fe:a9fe::1".into(), 80),
        ("loopback", "::1".into(), 80),
        ("unique_local", "fd00::2".into(), 22),
        ("host_itself", web.host_addr6.to_string(), host_port),
        ("gateway", "@gateway".into(), any_port),
    ]);
    let (k, ctx) = run_probe(&stack, &script);
    let get = |key: &str| k.get(key).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(
        get("internet"),
        format!("200 web6 from {}", web.host_addr6),
        "{ctx}"
    );
    for label in [
        "metadata",
        "nat64_metadata",
        "sixtofour_metadata",
        "unique_local",
        "gateway",
    ] {
        assert_eq!(get(label), "EACCES", "{label}\n{ctx}");
    }
    // An IPv4-mapped address is IPv4 on the wire: refused by the IPv4 rules.
    assert_eq!(get("mapped_private"), "EHOSTUNREACH", "{ctx}");
    // ::1 is the job's own loopback, where nothing listens on port 80.
    assert_eq!(get("loopback"), "ECONNREFUSED", "{ctx}");
    // The job's own table lets this through (a public address); the host's table drops
    // everything a job link sends to the host itself.
    assert_eq!(get("host_itself"), "TIMEOUT", "{ctx}");
    let addrs: Vec<&str> = get("addrs").split(',').collect();
    assert!(addrs.iter().any(|a| in_pool(a)), "{ctx}");
    for r in records(&stack, "job_wiped") {
        assert_eq!(r["leftovers"], serde_json::json!([]), "{r}");
    }
}

#[test]
fn without_an_ipv6_pool_jobs_have_no_ipv6_at_all() {
    let web = Internet::new([198, 51, 100]);
    web.serve6(8080, "web6");
    let stack = Stack::sandboxed_outbound_production("");
    let script = probe(&[("internet", web.addr6.to_string(), 8080)]);
    let (k, ctx) = run_probe(&stack, &script);
    let get = |key: &str| k.get(key).map(String::as_str).unwrap_or("<missing>");
    // No address to send from and no route: which of the two the kernel reports depends
    // on its version.
    assert!(
        matches!(get("internet"), "ENETUNREACH" | "EADDRNOTAVAIL"),
        "{ctx}"
    );
    assert_eq!(get("addrs"), "", "no IPv6 address at all\n{ctx}");
}
