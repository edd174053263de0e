//! The network a policy gives a sandboxed job (root; `[rule.sandbox] network`): an
//! outbound job reaches the internet (a namespace the test makes, see
//! `airlock_tests::internet`) but not the host, the host's metadata service or private
//! ranges; an endpoint-only job reaches nothing but its own endpoint. Both still get their
//! credentials from inside their own namespace.

use airlock_tests::internet::Internet;
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

use airlock_tests::kv;

/// A script that tries each `name=url` and prints `name=<http status or curl's error>`,
/// then the body of the first one.
fn probe_script(targets: &[(&str, String)]) -> String {
    let mut s = String::new();
    for (name, url) in targets {
        s.push_str(&format!(
            "out=$(curl -sS -m 3 -o /tmp/body -w '%{{http_code}}' '{url}' 2>&1); rc=$?; \
             if [ $rc -eq 0 ]; then echo \"{name}=$out $(cat /tmp/body)\"; \
             else echo \"{name}=curl$rc\"; fi\n"
        ));
    }
    s.push_str(
        "t=$(curl -sS -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://169.254.169.254/latest/api/token)\n\
         echo \"imds_role=$(curl -sS -H \"x-aws-ec2-metadata-token: $t\" http://169.254.169.254/latest/meta-data/iam/security-credentials/)\"\n",
    );
    s
}

#[test]
fn an_outbound_rule_reaches_the_internet_but_not_the_host_or_private_ranges() {
    let stack = Stack::sandboxed_outbound_production("");
    let internet = Internet::new([198, 51, 100]);
    let web = internet.serve(8080, "hello");
    // The host's own services: the STS stand-in (on loopback) and one on every address,
    // reached through the host's address toward the internet.
    let host_any = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let host_port = host_any.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in host_any.incoming() {
            drop(c);
        }
    });
    let targets = [
        ("internet", format!("http://{web}/")),
        (
            "host_public",
            format!("http://{}:{host_port}/", internet.host_addr),
        ),
        ("metadata_range", "http://169.254.1.1/".to_string()),
        ("private", "http://10.0.0.1/".to_string()),
    ];
    let script = probe_script(&targets);

    // Production: outbound.
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
    assert_eq!(
        get("internet"),
        format!("200 hello from {}", internet.host_addr),
        "masqueraded behind the host's address\n{ctx}"
    );
    // curl 7: could not connect (refused by the job's table at once); 28: timed out (the
    // host's table drops what a job sends to the host itself).
    assert_eq!(get("metadata_range"), "curl7", "{ctx}");
    assert_eq!(get("private"), "curl7", "{ctx}");
    assert_eq!(get("host_public"), "curl28", "{ctx}");
    // 169.254.169.254 is still the job's own IMDS.
    assert_eq!(get("imds_role"), "deploy", "{ctx}");

    // Staging has no [rule.sandbox]: endpoint only. Nothing leaves its namespace.
    let out = stack.run_sh(&GithubJob::staging().token(), &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ctx = format!(
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{ctx}");
    let k = kv(&stdout);
    let get = |key: &str| k.get(key).map(String::as_str).unwrap_or("<missing>");
    for (name, _) in &targets {
        assert_eq!(get(name), "curl7", "{name}: no route\n{ctx}");
    }
    assert_ne!(get("imds_role"), "", "{ctx}");

    // The audit says which network each job got.
    let started: Vec<(String, String)> = stack
        .agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "job_started")
        .map(|r| {
            (
                r["repository"].as_str().unwrap_or_default().to_string()
                    + " "
                    + r["environment"].as_str().unwrap_or_default(),
                r["sandbox"]["network"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        started.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(),
        ["outbound", "endpoint-only"],
        "{started:?}"
    );
    // Both wipes left nothing.
    for r in stack.agent.audit_records() {
        if r["event"] == "job_wiped" {
            assert_eq!(r["leftovers"], serde_json::json!([]), "{r}");
        }
    }
}
