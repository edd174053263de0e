//! `airlock policy explain` without a signed token and without the network, `--expect`,
//! `airlock policy test CASES.toml`, and `airlock policy check` / `airlockd --check`
//! reporting every error once, each at its place. Runs the built binaries as an operator
//! would; no agent, no STS.

use airlock_tests::oidc::{mint, GithubJob, TestKey};
use airlock_tests::paths;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn airlock(config: &Path, args: &[&str]) -> Output {
    Command::new(paths::bin("airlock"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run airlock (cargo build --bins)")
}

fn shipped_config() -> PathBuf {
    paths::repo_root().join("config/airlock.toml")
}

fn shipped_policies() -> String {
    paths::repo_root().join("policies").display().to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn claims_decided_as_if_verified_are_marked_as_a_what_if_and_expect_sets_the_status() {
    let d = tempfile::tempdir().unwrap();
    let claims = GithubJob::production().claims();
    let file = write(d.path(), "claims.json", &claims.to_string());
    let file = file.to_string_lossy();
    let dir = shipped_policies();
    let base = [
        "policy",
        "explain",
        "--dir",
        &dir,
        "--claims-file",
        &file,
        "--as-verified",
        "github",
    ];

    let out = airlock(&shipped_config(), &base);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let first = t.lines().next().unwrap_or("");
    assert!(
        first.starts_with("WHAT-IF: claims not verified")
            && first.contains("https://token.actions.githubusercontent.com"),
        "{t}"
    );
    assert!(t.contains("decision: rule web-production grants:"), "{t}");

    let json = airlock(&shipped_config(), &[&base[..], &["--json"]].concat());
    let v: Value =
        serde_json::from_slice(&json.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&json)));
    assert_eq!(v["what_if"], true, "{v}");
    assert_eq!(v["decision"]["rule"], "web-production", "{v}");

    // --expect: met exits 0, not met exits 1 and says what happened.
    let met = airlock(
        &shipped_config(),
        &[&base[..], &["--expect", "web-production"]].concat(),
    );
    assert_eq!(met.status.code(), Some(0), "{}", text(&met));
    let missed = airlock(
        &shipped_config(),
        &[&base[..], &["--expect", "refused"]].concat(),
    );
    let t = text(&missed);
    assert_eq!(missed.status.code(), Some(1), "{t}");
    assert!(
        t.contains("--expect not met: expected a refusal, got rule web-production granting deploy, readonly"),
        "{t}"
    );
    let other = airlock(
        &shipped_config(),
        &[&base[..], &["--expect", "web-staging"]].concat(),
    );
    assert_eq!(other.status.code(), Some(1), "{}", text(&other));

    // An issuer the configuration does not have is named as such, with the file read.
    let out = airlock(
        &shipped_config(),
        &[
            "policy",
            "explain",
            "--dir",
            &dir,
            "--claims-file",
            &file,
            "--as-verified",
            "https://gitlab.example.com",
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(64), "{t}");
    assert!(
        t.contains("is not configured") && t.contains("config/airlock.toml"),
        "{t}"
    );
}

/// A configuration whose issuer's keys would be fetched from a host that does not resolve
/// (`.invalid`, RFC 6761), and a policy that trusts it.
fn unreachable_issuer(d: &Path) -> PathBuf {
    let policies = d.join("policies");
    std::fs::create_dir(&policies).unwrap();
    write(
        &policies,
        "10-gh.toml",
        "[[rule]]\nname = \"gh\"\n[rule.match]\nprovider = \"github\"\nrepository = \"acme/web\"\n\
         [[rule.grant]]\nalias = \"ro\"\nrole_arn = \"arn:aws:iam::123456789012:role/ro\"\n",
    );
    write(
        d,
        "airlock.toml",
        &format!(
            "[policy]\ndir = \"{}\"\n\n[[issuer]]\nissuer = \"https://token.actions.githubusercontent.com\"\n\
             audiences = [\"airlock-test\"]\njwks_url = \"https://keys.airlock-test.invalid/jwks\"\n",
            policies.display()
        ),
    )
}

#[test]
fn explaining_a_token_makes_no_network_call_unless_asked() {
    let d = tempfile::tempdir().unwrap();
    let config = unreachable_issuer(d.path());
    let token = mint(TestKey::Rsa, &GithubJob::production().claims());
    let file = write(d.path(), "token", &token);
    let file = file.to_string_lossy();

    let started = Instant::now();
    let out = airlock(&config, &["policy", "explain", "--oidc-token-file", &file]);
    let took = started.elapsed();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {t}");
    let first = t.lines().next().unwrap_or("");
    assert!(
        first.starts_with("WHAT-IF: token not verified")
            && first.contains("https://keys.airlock-test.invalid/jwks")
            && first.contains("--verify"),
        "{t}"
    );
    assert!(t.contains("MATCH gh"), "{t}");
    assert!(!t.contains(&token), "the token must never be printed");
    let sig = token.rsplit('.').next().unwrap();
    assert!(!t.contains(sig), "nor its signature");

    // Asked: it tries the keys, and says why it could not verify.
    let out = airlock(
        &config,
        &["policy", "explain", "--verify", "--oidc-token-file", &file],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(t.contains("identity token refused"), "{t}");
    assert!(!t.contains(&token), "{t}");

    // A token of an issuer the configuration does not have: said, with the file read.
    let other = airlock_tests::oidc::mint_with(
        &TestKey::Rsa.file(),
        TestKey::Rsa.kid(),
        TestKey::Rsa.alg(),
        "https://ci.elsewhere.invalid",
        "airlock-test",
        &GithubJob::production().claims(),
        300,
    )
    .unwrap();
    let f2 = write(d.path(), "token2", &other);
    let out = airlock(
        &config,
        &[
            "policy",
            "explain",
            "--oidc-token-file",
            &f2.to_string_lossy(),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(
        t.contains("\"https://ci.elsewhere.invalid\" is not configured in")
            && t.contains(&config.display().to_string()),
        "{t}"
    );
}

#[test]
fn policy_test_runs_the_shipped_cases_and_reports_failures_with_their_place() {
    let root = paths::repo_root();
    let cases = root.join("policies/cases/shipped.toml");
    let dir = shipped_policies();
    let out = airlock(
        &shipped_config(),
        &["policy", "test", &cases.to_string_lossy(), "--dir", &dir],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.starts_with("WHAT-IF: "), "{t}");
    let ok = t.lines().filter(|l| l.starts_with("ok    ")).count();
    assert!(ok >= 5, "{t}");
    assert!(
        t.contains(&format!("{ok} case(s): {ok} passed, 0 failed")),
        "{t}"
    );

    // A failing case: exit 1, its place and what differs.
    let d = tempfile::tempdir().unwrap();
    let bad = write(
        d.path(),
        "cases.toml",
        "[[case]]\nname = \"pr\"\nissuer = \"github\"\nexpect = \"web-production\"\n\
         [case.claims]\nrepository = \"acme/web\"\nrepository_owner = \"acme\"\nevent_name = \"pull_request\"\n\
         ref = \"refs/pull/1/merge\"\n\n\
         [[case]]\nname = \"grants\"\nissuer = \"github\"\nexpect = \"acme-ci-readonly\"\ngrants = [\"deploy\"]\n\
         [case.claims]\nrepository = \"acme/tools\"\nrepository_owner = \"acme\"\n",
    );
    let out = airlock(
        &shipped_config(),
        &["policy", "test", &bad.to_string_lossy(), "--dir", &dir],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("FAIL  pr ({}:1:1)", bad.display())),
        "{t}"
    );
    assert!(
        t.contains(
            "expected rule web-production to grant, got rule acme-ci-readonly granting readonly"
        ),
        "{t}"
    );
    assert!(
        t.contains("expected grants not granted: [\"deploy\"]"),
        "{t}"
    );
    assert!(
        t.contains("granted but not expected: [\"readonly\"]"),
        "{t}"
    );
    assert!(t.contains("2 case(s): 0 passed, 2 failed"), "{t}");

    // Errors in the cases file: every one, at its line, exit 65.
    let broken = write(
        d.path(),
        "broken.toml",
        "[[case]]\nname = \"a\"\nissuer = \"gitlab\"\nexpect = \"x\"\nclaims = {}\n\n\
         [[case]]\nname = \"b\"\nissuer = \"github\"\nexpect = \"x\"\nclaims = {}\nat = \"yesterday\"\n",
    );
    let out = airlock(
        &shipped_config(),
        &["policy", "test", &broken.to_string_lossy(), "--dir", &dir],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(
        t.contains(&format!("{}:3:10: case \"a\"", broken.display())),
        "{t}"
    );
    assert!(
        t.contains(&format!("{}:12:6: case \"b\"", broken.display())),
        "{t}"
    );
}

#[test]
fn every_policy_and_config_error_is_reported_once_at_its_place() {
    let d = tempfile::tempdir().unwrap();
    let policies = d.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    write(
        &policies,
        "10-a.toml",
        "[[rule]]\nname = \"a\"\n[rule.match]\nprovider = \"github\"\nrepo = \"acme/web\"\n\
         [[rule.grant]]\nalias = \"x\"\nrole_arn = \"arn:aws:iam::1:role/r\"\n\n\
         [[rule]]\nname = \"b\"\n[rule.match]\nprovider = \"github\"\n\
         [[rule.grant]]\nalias = \"y\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nduration = 60\n",
    );
    write(&policies, "policy.tml", "# meant as a policy\n");
    let config = write(
        d.path(),
        "airlock.toml",
        &format!(
            "[policy]\ndir = \"{}\"\n\n[[issuer]]\nissuer = \"https://token.actions.githubusercontent.com\"\n\
             audiences = [\"sts.amazonaws.com\"]\njwks_file = \"{}\"\n",
            policies.display(),
            paths::oidc_fixtures().join("jwks.json").display()
        ),
    );
    let check = |args: &[&str]| airlock(&config, args);
    let out = check(&["policy", "check"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    for needle in [
        "10-a.toml:5:1: unknown match field \"repo\"",
        "10-a.toml:8:12: bad role_arn",
        "10-a.toml:17:12: duration 60 s",
    ] {
        assert_eq!(t.matches(needle).count(), 1, "{needle:?} once in:\n{t}");
    }
    assert!(t.contains("3 errors"), "{t}");

    let daemon = Command::new(paths::bin("airlockd"))
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .output()
        .expect("run airlockd (cargo build --bins)");
    let t = text(&daemon);
    assert_eq!(daemon.status.code(), Some(65), "{t}");
    for needle in [
        "unknown match field \"repo\"",
        "bad role_arn",
        "duration 60 s",
    ] {
        assert_eq!(t.matches(needle).count(), 1, "{needle:?} once in:\n{t}");
    }

    // Fixed, it loads, and the file that is not *.toml is warned about.
    write(
        &policies,
        "10-a.toml",
        "[[rule]]\nname = \"a\"\n[rule.match]\nprovider = \"github\"\nrepository = \"acme/web\"\n\
         [[rule.grant]]\nalias = \"x\"\nrole_arn = \"arn:aws:iam::123456789012:role/r\"\nduration = \"2h\"\n",
    );
    let out = check(&["policy", "check"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.contains(&format!(
            "warning: {}: not loaded",
            policies.join("policy.tml").display()
        )),
        "{t}"
    );
    // With the agent's own credentials from the environment (the default) nothing is said;
    // from the instance profile they are a session, and a 2 h grant is warned about at its
    // duration.
    assert!(!t.contains("chained role session"), "source = env: {t}");
    let mut cfg = std::fs::read_to_string(&config).unwrap();
    cfg.push_str("\n[credentials]\nsource = \"imds\"\n");
    std::fs::write(&config, cfg).unwrap();
    let t = text(&check(&["policy", "check"]));
    assert!(
        t.contains(&format!(
            "warning: {}:9:12: rule \"a\" grant \"x\": duration 7200 s is longer than the 3600 s",
            policies.join("10-a.toml").display()
        )) && t.contains("source = \"imds\""),
        "{t}"
    );

    // A config error names its line, once, in both commands.
    let mut cfg = std::fs::read_to_string(&config).unwrap();
    cfg.push_str("\n[endpoint]\nbind = \"0.0.0.0\"\n");
    std::fs::write(&config, &cfg).unwrap();
    let line = cfg.lines().position(|l| l.starts_with("bind =")).unwrap() + 1;
    let want = format!("config {}:{line}:8: [endpoint] bind", config.display());
    let t = text(&check(&["policy", "check"]));
    assert_eq!(t.matches(&want).count(), 1, "{want:?} in:\n{t}");
    let daemon = Command::new(paths::bin("airlockd"))
        .arg("--config")
        .arg(&config)
        .arg("--check")
        .output()
        .unwrap();
    let t = text(&daemon);
    assert_eq!(daemon.status.code(), Some(78), "{t}");
    assert_eq!(t.matches(&want).count(), 1, "{want:?} in:\n{t}");
}
