//! Egress-controlled jobs end to end (root): the production rule gets a `[rule.egress]`
//! allowlist; the job runs real `curl` inside its sandbox; its only resolver is the agent,
//! which forwards allowed names to a fake upstream resolver (`airlock_tests::fakedns`) and
//! admits the answered addresses before releasing the answer; "the internet" is namespaces
//! the test makes (`airlock_tests::internet`).

use airlock_tests::fakedns::{FakeDns, Zone};
use airlock_tests::internet::Internet;
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;
use serde_json::Value;
use std::collections::BTreeMap;

/// `key=value` lines of a job's stdout.
fn kv(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Shell lines that fetch each `name=url` with curl and print `name=<status> <body>` or
/// `name=curl<exit code>` (6: could not resolve, 7: could not connect, 28: timeout).
fn curls(targets: &[(&str, String)]) -> String {
    targets
        .iter()
        .map(|(name, url)| {
            format!(
                "out=$(curl -sS -m 5 -o /tmp/body -w '%{{http_code}}' '{url}' 2>/dev/null); rc=$?; \
                 if [ $rc -eq 0 ]; then echo \"{name}=$out $(cat /tmp/body)\"; else echo \"{name}=curl$rc\"; fi\n"
            )
        })
        .collect()
}

/// A probe of other resolvers: a UDP query to `udp_host:53` and a TCP connect to
/// `tcp_host:53`, each printing `ok` or the errno name.
fn other_resolvers(udp_host: &str, tcp_host: &str) -> String {
    format!(
        r#"python3 - <<'EOF'
import errno, socket
def attempt(label, f):
    try:
        f()
        print(label + "=ok")
    except socket.timeout:
        print(label + "=TIMEOUT")
    except OSError as e:
        print(label + "=" + errno.errorcode.get(e.errno, str(e)))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01", ("{udp_host}", 53))
    s.recv(512)
def tcp():
    socket.create_connection(("{tcp_host}", 53), timeout=2).close()
attempt("dns_udp_elsewhere", udp)
attempt("dns_tcp_elsewhere", tcp)
print("resolv_conf=" + open("/etc/resolv.conf").read().replace("\n", "|"))
EOF
"#
    )
}

fn records(stack: &Stack, event: &str) -> Vec<Value> {
    stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == event)
        .collect()
}

#[test]
fn a_job_reaches_only_what_its_allowlist_names() {
    let web = Internet::new([192, 0, 2]);
    let elsewhere = Internet::new([192, 0, 2]);
    let web_8080 = web.serve(8080, "web");
    web.serve(8081, "web-8081");
    let direct = elsewhere.serve(8080, "elsewhere");
    elsewhere.serve(53, "not a resolver");
    let zone = Zone::default()
        .a("allowed.test", web.addr, 60)
        .a("x.wild.test", web.addr, 60)
        .a("wild.test", web.addr, 60)
        .a("other.test", elsewhere.addr, 60)
        .cname("alias.test", "edge.cdn.test", 60)
        .a("edge.cdn.test", web.addr, 60)
        .cname("evil.test", "allowed.test", 60);
    let dns = FakeDns::start(zone);
    let stack = Stack::sandboxed_production_tables(
        &format!("[egress]\nupstreams = [\"{}\"]\n", dns.addr),
        "[rule.egress]\nallow = [\"allowed.test:8080\", \"*.wild.test:8080\", \"alias.test:8080\"]\n",
    );
    let mut script = curls(&[
        ("allowed", "http://allowed.test:8080/".into()),
        ("upper_case", "http://ALLOWED.Test:8080/".into()),
        ("other_port", "http://allowed.test:8081/".into()),
        ("wildcard", "http://x.wild.test:8080/".into()),
        ("bare_suffix", "http://wild.test:8080/".into()),
        ("not_listed", "http://other.test:8080/".into()),
        ("cname_to_unlisted", "http://alias.test:8080/".into()),
        ("unlisted_cname_to_listed", "http://evil.test:8080/".into()),
        ("direct_ip", format!("http://{direct}/")),
    ]);
    script.push_str(&other_resolvers(
        &elsewhere.addr.to_string(),
        &elsewhere.addr.to_string(),
    ));
    let out = stack.run_sh(&GithubJob::production().token(), &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.agent.log()
    );
    assert!(out.status.success(), "{ctx}");
    let k = kv(&stdout);
    let get = |key: &str| k.get(key).map(String::as_str).unwrap_or("<missing>");
    let from_host = format!("from {}", web.host_addr);
    assert_eq!(get("allowed"), format!("200 web {from_host}"), "{ctx}");
    assert_eq!(get("upper_case"), format!("200 web {from_host}"), "{ctx}");
    assert_eq!(
        get("other_port"),
        "curl7",
        "an allowed name on another port\n{ctx}"
    );
    assert_eq!(get("wildcard"), format!("200 web {from_host}"), "{ctx}");
    assert_eq!(
        get("bare_suffix"),
        "curl6",
        "*.wild.test does not cover wild.test\n{ctx}"
    );
    assert_eq!(get("not_listed"), "curl6", "{ctx}");
    assert_eq!(
        get("cname_to_unlisted"),
        format!("200 web {from_host}"),
        "{ctx}"
    );
    assert_eq!(get("unlisted_cname_to_listed"), "curl6", "{ctx}");
    assert_eq!(get("direct_ip"), "curl7", "{ctx}");
    assert_eq!(get("dns_udp_elsewhere"), "EPERM", "{ctx}");
    assert_eq!(get("dns_tcp_elsewhere"), "EHOSTUNREACH", "{ctx}");
    assert!(
        get("resolv_conf").contains("nameserver 169.254.170.53"),
        "{ctx}"
    );
    // Refused names never left the agent.
    for name in ["other.test", "wild.test", "evil.test"] {
        assert_eq!(dns.queries_for(name), 0, "{name} was forwarded\n{ctx}");
    }
    assert!(dns.queries_for("allowed.test") > 0);
    let _ = web_8080;

    // The audit: refused names, and blocked connections with the name they came from.
    let refused: Vec<String> = records(&stack, "egress_dns")
        .iter()
        .filter(|r| r["verdict"] == "refused")
        .map(|r| r["name"].as_str().unwrap_or_default().to_string())
        .collect();
    for name in ["other.test", "wild.test", "evil.test"] {
        assert!(refused.iter().any(|n| n == name), "{name}: {refused:?}");
    }
    let blocked = records(&stack, "egress_blocked");
    assert!(
        blocked.iter().any(|r| r["dst"] == web.addr.to_string()
            && r["port"] == 8081
            && r["proto"] == "tcp"
            && r["name"] == "allowed.test"),
        "{blocked:?}"
    );
    assert!(
        blocked
            .iter()
            .any(|r| r["dst"] == elsewhere.addr.to_string()
                && r["port"] == 8080
                && r["name"].is_null()),
        "{blocked:?}"
    );
    let started = records(&stack, "job_started");
    assert_eq!(
        started[0]["sandbox"]["network"], "egress-block",
        "{started:?}"
    );
    for r in records(&stack, "job_wiped") {
        assert_eq!(r["leftovers"], serde_json::json!([]), "{r}");
    }
}
