//! The operator's view: `airlock run`, `airlock job start` with bad tokens, policy reloads
//! and refusals, restarts of `airlockd`.

use airlock_tests::agent::{HarnessError, Policies};
use airlock_tests::oidc::{self, GithubJob, TestKey, GITHUB_ISSUER, TEST_AUDIENCE};
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::json;
use std::time::{Duration, Instant};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_serves_production(stack: &Stack) {
    assert_eq!(stack.agent.healthz(), Some(200));
    let job = stack.job(&GithubJob::production().with_run_id(oidc::now()));
    let (status, body) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["RoleArn"].as_str(),
        Some("arn:aws:iam::123456789012:role/web-prod-deploy")
    );
}

#[test]
fn airlock_run_exits_with_the_commands_status_and_strips_host_credentials() {
    let stack = Stack::start();
    let file = stack.agent.token_file(&GithubJob::production().token());
    let file = file.to_string_lossy();
    let out = stack.agent.cli_env(
        &[
            "run",
            "--oidc-token-file",
            &file,
            "--",
            "sh",
            "-c",
            "env; exit 7",
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIAHOSTKEYMUSTNOTLEAK"),
            ("AWS_SECRET_ACCESS_KEY", "host-secret-must-not-leak"),
            ("AWS_PROFILE", "host-profile"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(
        stdout.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("AWS_CONFIG_FILE=/dev/null"), "{stdout}");
    for leak in [
        "AKIAHOSTKEYMUSTNOTLEAK",
        "host-secret-must-not-leak",
        "AWS_PROFILE=",
    ] {
        assert!(
            !stdout.contains(leak),
            "host variable reached the job: {leak}"
        );
    }

    // A real client inside `airlock run`, and exit 0 passes through too.
    let aws = paths::venv_bin("aws");
    let out = stack.agent.cli(&[
        "run",
        "--oidc-token-file",
        &file,
        "--",
        &aws.to_string_lossy(),
        "sts",
        "get-caller-identity",
        "--endpoint-url",
        stack.sts(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(":assumed-role/web-prod-deploy/"),
        "{}",
        text(&out)
    );
    // `run` ends its jobs.
    let list = stack.agent.cli(&["job", "list", "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap_or(json!([]));
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{}", text(&list));
}

#[test]
fn bad_tokens_are_refused_with_the_reason_and_the_agent_keeps_serving() {
    let stack = Stack::start();
    let good = GithubJob::production().claims();
    let now = oidc::now();
    let rsa = TestKey::Rsa;
    let mint = |claims: &serde_json::Value, aud: &str, iss: &str, key: TestKey| {
        oidc::mint_with(&key.file(), key.kid(), key.alg(), iss, aud, claims, 300).expect("mint")
    };
    let mut expired = good.clone();
    expired["exp"] = json!(now - 600);
    expired["iat"] = json!(now - 900);
    expired["nbf"] = json!(now - 900);
    let mut full = good.clone();
    full["iss"] = json!(GITHUB_ISSUER);
    full["aud"] = json!(TEST_AUDIENCE);
    full["exp"] = json!(now + 300);
    full["iat"] = json!(now);
    let hs256 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some("test-rsa-1".into());
        // The classic confusion: an HMAC keyed with the issuer's public key material.
        let key = std::fs::read(paths::oidc_fixtures().join("jwks.json")).expect("jwks");
        jsonwebtoken::encode(&h, &full, &jsonwebtoken::EncodingKey::from_secret(&key))
            .expect("hs256")
    };
    let tampered = {
        let t = mint(&good, TEST_AUDIENCE, GITHUB_ISSUER, rsa);
        let other = mint(
            &GithubJob::staging().claims(),
            TEST_AUDIENCE,
            GITHUB_ISSUER,
            rsa,
        );
        let p: Vec<&str> = t.split('.').collect();
        let q: Vec<&str> = other.split('.').collect();
        format!("{}.{}.{}", p[0], q[1], p[2])
    };
    let mut big = good.clone();
    big["padding"] = json!("x".repeat(100_000));
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "expired",
            mint(&expired, TEST_AUDIENCE, GITHUB_ISSUER, rsa),
            &["expired"],
        ),
        (
            "wrong audience",
            mint(&good, "someone-else", GITHUB_ISSUER, rsa),
            &["audience", "aud"],
        ),
        (
            "unknown issuer",
            mint(&good, TEST_AUDIENCE, "https://evil.example", rsa),
            &["issuer", "iss"],
        ),
        (
            "alg none",
            oidc::forge(
                &json!({"alg": "none", "typ": "JWT", "kid": "test-rsa-1"}),
                &full,
                b"",
            ),
            &["alg", "none"],
        ),
        ("HS256", hs256, &["alg", "hs256"]),
        (
            "unknown kid",
            mint(&good, TEST_AUDIENCE, GITHUB_ISSUER, TestKey::RsaRotated),
            &["kid", "key"],
        ),
        ("bad signature", tampered, &["signature", "invalid"]),
        (
            "oversized",
            mint(&big, TEST_AUDIENCE, GITHUB_ISSUER, rsa),
            &["large", "size", "long", "limit", "bytes"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, token, words) in &cases {
        let file = stack.agent.token_file(token);
        let out = stack
            .agent
            .cli(&["job", "start", "--oidc-token-file", &file.to_string_lossy()]);
        let all = text(&out);
        let lower = all.to_lowercase();
        if out.status.success() {
            failures.push(format!("{name}: accepted: {all}"));
        } else if !words.iter().any(|w| lower.contains(w)) {
            failures.push(format!(
                "{name}: reason should mention one of {words:?}: {all}"
            ));
        }
        if all.contains(token.as_str()) {
            failures.push(format!("{name}: the token was echoed back"));
        }
    }
    assert!(failures.is_empty(), "bad tokens:\n{}", failures.join("\n"));
    assert_serves_production(&stack);
}

const BROKEN_POLICY: &str =
    "[[rule]]\nname = \"broken\ndescription = \"unterminated string above\"\n";

#[test]
fn sighup_with_a_broken_policy_keeps_the_old_one_and_says_why() {
    let stack = Stack::start();
    assert_serves_production(&stack);
    std::fs::write(
        stack.agent.policy_dir().join("50-broken.toml"),
        BROKEN_POLICY,
    )
    .expect("write policy");
    assert!(stack.agent.signal("HUP"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.agent.log().contains("50-broken.toml") {
        assert!(
            Instant::now() < deadline,
            "the reload failure was not logged with the file name:\n{}",
            stack.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        stack.agent.log().contains("50-broken.toml:2:"),
        "log should name file:line:col:\n{}",
        stack.agent.log()
    );
    assert_serves_production(&stack);
}

#[test]
fn airlockd_refuses_to_start_with_a_bad_policy() {
    let mut stack = Stack::start();
    std::fs::write(
        stack.agent.policy_dir().join("50-broken.toml"),
        BROKEN_POLICY,
    )
    .expect("write policy");

    let check = std::process::Command::new(paths::bin("airlockd"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .arg("--check")
        .output()
        .expect("run airlockd --check");
    assert_eq!(check.status.code(), Some(65), "{}", text(&check));
    assert!(
        text(&check).contains("50-broken.toml:2:"),
        "{}",
        text(&check)
    );

    let policy = stack.agent.cli(&[
        "policy",
        "check",
        &stack.agent.policy_dir().to_string_lossy(),
    ]);
    assert!(!policy.status.success(), "{}", text(&policy));
    assert!(
        text(&policy).contains("50-broken.toml:2:"),
        "{}",
        text(&policy)
    );

    match stack.agent.restart() {
        Err(HarnessError::ExitedEarly { status, log }) => {
            assert!(
                status.contains("65") || status.contains("78"),
                "exit {status}\n{log}"
            );
            assert!(log.contains("50-broken.toml:2:"), "{log}");
        }
        Err(other) => panic!("airlockd should exit at once with a bad policy: {other}"),
        Ok(()) => panic!("airlockd started with a broken policy"),
    }
}

#[test]
fn airlockd_refuses_a_bad_config_with_the_line() {
    let stack = Stack::start_with(|o| o.policies(Policies::Repo));
    let bad = stack.agent.dir().join("bad.toml");
    let good = std::fs::read_to_string(stack.agent.config_path()).expect("config");
    std::fs::write(&bad, good.replace("[sts]\n", "[sts]\nendpont = \"x\"\n")).expect("write");
    let out = std::process::Command::new(paths::bin("airlockd"))
        .arg("--config")
        .arg(&bad)
        .arg("--check")
        .output()
        .expect("run airlockd");
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(text(&out).contains("endpont"), "{}", text(&out));
}

#[test]
fn a_running_jobs_endpoint_works_again_after_airlockd_restarts() {
    let mut stack = Stack::start();
    let job = stack.job(&GithubJob::production());
    let (status, before) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 200);
    stack.agent.restart().expect("airlockd restarts");
    let deadline = Instant::now() + Duration::from_secs(15);
    let after = loop {
        match job.credentials() {
            Ok((200, body)) => break body,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "endpoint after restart: {other:?}\n{}",
                    stack.agent.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(after["RoleArn"], before["RoleArn"]);
    // Another token still does not work on the recovered listener.
    let (status, _) = job
        .get_with_token("/v1/credentials", "not-the-token")
        .expect("endpoint answers");
    assert_eq!(status, 403);
}
