//! Identities from different issuers are never one: a real `airlockd` trusting GitHub,
//! Buildkite and GitLab (test keys), tokens signed by each, the repository's policies
//! (written for GitHub's organisation `acme`) and moto as STS.
//!
//! - A Buildkite organisation and a GitLab group that are also called `acme` present tokens
//!   whose names are GitHub's acme/web's: they get nothing (the attack of issue 10, item 5).
//! - A rule that could match tokens of two issuers stops the agent at start (exit 65,
//!   file:line:column) and is refused by a reload, which keeps the old policy.
//! - An id pin refuses the token of a re-registered organisation (same name, another
//!   `repository_owner_id`) and accepts the right one.
//! - `airlock policy explain` shows each rule's issuer, its id pins, and why a token of
//!   another issuer does not match.

use airlock_tests::agent::{HarnessError, Policies};
use airlock_tests::oidc::{self, GithubJob, TestKey, GITHUB_ISSUER, TEST_AUDIENCE};
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::{json, Value};
use std::process::Output;
use std::time::{Duration, Instant};

const BUILDKITE_ISSUER: &str = "https://agent.buildkite.com";
const GITLAB_ISSUER: &str = "https://gitlab.airlock.test";
const GITLAB_OTHER: &str = "https://gitlab-other.airlock.test";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `[[issuer]]` tables trusting the fixture keys for each `(issuer, provider)`.
fn issuers(list: &[(&str, &str)]) -> String {
    let jwks = paths::oidc_fixtures().join("jwks.json");
    list.iter()
        .map(|(iss, provider)| {
            format!(
                "\n[[issuer]]\nissuer = \"{iss}\"\naudiences = [\"{TEST_AUDIENCE}\"]\nprovider = \"{provider}\"\njwks_file = \"{}\"\n",
                jwks.display()
            )
        })
        .collect()
}

/// An unsandboxed agent that also trusts Buildkite and GitLab, with `policies`.
fn stack(policies: Policies) -> Stack {
    Stack::start_with(|mut o| {
        o.extra_config = issuers(&[(BUILDKITE_ISSUER, "buildkite"), (GITLAB_ISSUER, "gitlab")]);
        o.policies(policies)
    })
}

fn sign(issuer: &str, claims: &Value) -> String {
    let key = TestKey::Rsa;
    oidc::mint_with(
        &key.file(),
        key.kid(),
        key.alg(),
        issuer,
        TEST_AUDIENCE,
        claims,
        300,
    )
    .expect("minting a test token")
}

/// A Buildkite token of organisation `acme`, pipeline `web`, on main.
fn buildkite_acme() -> String {
    sign(
        BUILDKITE_ISSUER,
        &json!({
            "sub": "organization:acme:pipeline:web:ref:refs/heads/main:commit:9f8e7d:step:deploy",
            "organization_slug": "acme",
            "pipeline_slug": "web",
            "build_number": 42,
            "build_branch": "main",
            "build_commit": "9f8e7d",
            "build_source": "ui",
            "job_id": "0190a1b2-0000-4000-8000-0000000000aa",
        }),
    )
}

/// A GitLab token of group `acme`, project `acme/web`, on main.
fn gitlab_acme() -> String {
    sign(
        GITLAB_ISSUER,
        &json!({
            "sub": "project_path:acme/web:ref_type:branch:ref:main",
            "namespace_id": "7",
            "namespace_path": "acme",
            "project_id": "22",
            "project_path": "acme/web",
            "user_login": "alice",
            "pipeline_id": "4100",
            "pipeline_source": "push",
            "job_id": "302",
            "ref": "main",
            "ref_type": "branch",
        }),
    )
}

/// A GitHub job of acme/tools on a feature branch: the read-only rule's.
fn github_acme_tools() -> GithubJob {
    GithubJob {
        repository: "acme/tools".into(),
        git_ref: "refs/heads/feature/x".into(),
        environment: None,
        event_name: "push".into(),
        actor: "dev1".into(),
        run_id: 9_200_001,
        workflow: "ci.yml".into(),
    }
}

/// The reproduced attack, end to end: before rules were scoped to an issuer, both tokens
/// matched the repository's `acme-ci-readonly` rule (owner `acme`, repository `acme/*`).
#[test]
fn a_buildkite_org_and_a_gitlab_group_called_acme_get_nothing_from_githubs_acme_rules() {
    let stack = stack(Policies::Repo);
    for (who, token) in [("buildkite", buildkite_acme()), ("gitlab", gitlab_acme())] {
        let job = stack
            .agent
            .start_job(&token)
            .unwrap_or_else(|e| panic!("{who}: the token verifies, the job starts refused: {e}"));
        assert_eq!(job.rule, None, "{who}: {:?}", job.raw);
        assert!(job.grants.is_empty(), "{who}: {:?}", job.raw);
        let refused = job.refused.clone().unwrap_or_default();
        assert!(
            refused.starts_with(&format!("no policy rule matches {who} acme/web")),
            "{who}: {refused}"
        );
        // Its endpoint serves it nothing, and STS was never asked.
        let (status, body) = job.credentials().expect("the job's endpoint answers");
        assert!((400..500).contains(&status), "{who}: {status} {body}");
        assert!(
            stack.agent.session_name(&job.job_id).is_none(),
            "{who}: credentials were issued"
        );
        let started = stack
            .agent
            .audit_records()
            .into_iter()
            .find(|r| r["event"] == "job_started" && r["job"] == job.job_id.as_str())
            .expect("a job_started record");
        assert_eq!(
            started["refused"].as_str(),
            Some(refused.as_str()),
            "{started}"
        );
        assert!(stack.agent.end_job(&job.job_id).status.success());
    }
    // The same names from GitHub's issuer get what the rule says.
    let job = stack.job(&github_acme_tools());
    assert_eq!(
        job.rule.as_deref(),
        Some("acme-ci-readonly"),
        "{:?}",
        job.raw
    );
    let (status, body) = job.credentials().expect("the job's endpoint answers");
    assert_eq!(status, 200, "{body}");
}

/// A rule with `provider = "gitlab"` on an agent that trusts two GitLab instances.
const TWO_ISSUERS: &str = "# could match tokens of either GitLab\n[[rule]]\nname = \"gitlab-acme\"\n\
                           [rule.match]\nprovider = \"gitlab\"\nowner = \"acme\"\n\
                           [[rule.grant]]\nalias = \"ci\"\nrole_arn = \"arn:aws:iam::123456789012:role/ci-readonly\"\n";

fn wait_for_log(stack: &Stack, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.agent.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{needle:?} not logged:\n{}",
            stack.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_rule_that_could_match_two_issuers_stops_the_agent_and_a_reload_keeps_the_old_policy() {
    let mut stack = Stack::start_with(|mut o| {
        o.extra_config = issuers(&[(GITLAB_ISSUER, "gitlab"), (GITLAB_OTHER, "gitlab")]);
        o
    });
    let before = stack.job(&GithubJob::production());
    assert_eq!(before.rule.as_deref(), Some("web-production"));

    // SIGHUP: refused at file:line:column, naming both issuers; the old policy stays.
    let file = stack.agent.policy_dir().join("50-gitlab.toml");
    std::fs::write(&file, TWO_ISSUERS).expect("write policy");
    assert!(stack.agent.signal("HUP"));
    let place = "50-gitlab.toml:5:12: rule \"gitlab-acme\": provider = \"gitlab\" could match tokens of 2 configured issuers (https://gitlab.airlock.test, https://gitlab-other.airlock.test)";
    wait_for_log(&stack, place);
    // The record is written by the audit log's writer thread, a moment after the log line.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let failed = loop {
        let found = stack
            .agent
            .audit_records()
            .into_iter()
            .find(|r| r["event"] == "policy_reload_failed");
        match found {
            Some(r) => break r,
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            None => panic!("no policy_reload_failed record within 10 s"),
        }
    };
    assert!(
        failed["error"].as_str().unwrap_or("").contains(place),
        "{failed}"
    );
    let after = stack.job(&GithubJob::production().with_run_id(9_100_050));
    assert_eq!(after.rule.as_deref(), Some("web-production"));
    assert_eq!(after.credentials().expect("endpoint").0, 200);
    // The old set has no GitLab rule: a GitLab token of acme is still refused.
    let gl = stack.agent.start_job(&gitlab_acme()).expect("job starts");
    assert!(gl.grants.is_empty() && gl.rule.is_none(), "{:?}", gl.raw);

    // At start: `airlockd --check`, `airlock policy check` and the agent itself refuse it.
    let check = std::process::Command::new(paths::bin("airlockd"))
        .arg("--config")
        .arg(stack.agent.config_path())
        .arg("--check")
        .output()
        .expect("run airlockd --check");
    assert_eq!(check.status.code(), Some(65), "{}", text(&check));
    assert!(text(&check).contains(place), "{}", text(&check));
    let policy = stack.agent.cli(&[
        "policy",
        "check",
        &stack.agent.policy_dir().to_string_lossy(),
    ]);
    assert_eq!(policy.status.code(), Some(65), "{}", text(&policy));
    assert!(text(&policy).contains(place), "{}", text(&policy));
    match stack.agent.restart() {
        Err(HarnessError::ExitedEarly { status, log }) => {
            assert!(status.contains("65"), "exit {status}\n{log}");
            assert!(log.contains(place), "{log}");
        }
        Err(other) => panic!("airlockd should exit at once: {other}"),
        Ok(()) => panic!("airlockd started with a rule that could match two issuers"),
    }

    // Naming one of the two makes it load.
    std::fs::write(
        &file,
        TWO_ISSUERS.replace(
            "provider = \"gitlab\"",
            &format!("issuer = \"{GITLAB_ISSUER}\""),
        ),
    )
    .expect("write policy");
    stack.agent.restart().expect("airlockd starts");
    let gl = stack.agent.start_job(&gitlab_acme()).expect("job starts");
    assert_eq!(gl.rule.as_deref(), Some("gitlab-acme"), "{:?}", gl.raw);
}

/// The organisation `acme` pinned by id: GitHub's `repository_owner_id` of the real one is
/// 500001 (the test tokens' value); someone who re-registers the name gets another id.
const PINNED: &str = "[[rule]]\nname = \"acme-pinned\"\n[rule.match]\nprovider = \"github\"\n\
                      owner = \"acme\"\nrepository_owner_id = \"500001\"\n\
                      [[rule.grant]]\nalias = \"deploy\"\n\
                      role_arn = \"arn:aws:iam::123456789012:role/web-staging-deploy\"\n";

#[test]
fn an_id_pin_refuses_a_re_registered_organisation_and_accepts_the_right_one() {
    let stack = stack(Policies::Files(vec![(
        "10-pinned.toml".into(),
        PINNED.into(),
    )]));
    let ours = GithubJob::staging();
    let job = stack.job(&ours);
    assert_eq!(job.rule.as_deref(), Some("acme-pinned"), "{:?}", job.raw);
    assert_eq!(job.credentials().expect("endpoint").0, 200);

    let mut claims = ours.with_run_id(9_100_060).claims();
    claims["repository_owner_id"] = json!("987654321");
    let squatter = oidc::mint(TestKey::Rsa, &claims);
    let job = stack
        .agent
        .start_job(&squatter)
        .expect("the token verifies");
    assert_eq!(
        (job.rule.as_deref(), job.grants.len()),
        (None, 0),
        "{:?}",
        job.raw
    );
    assert!(
        job.refused
            .as_deref()
            .unwrap_or("")
            .starts_with("no policy rule matches github acme/web"),
        "{:?}",
        job.raw
    );
    let (status, _) = job.credentials().expect("endpoint");
    assert!((400..500).contains(&status), "{status}");
    assert!(stack.agent.session_name(&job.job_id).is_none());

    // Why, from `policy explain`.
    let f = stack.agent.token_file(&squatter);
    let out = stack.agent.cli(&[
        "policy",
        "explain",
        "--oidc-token-file",
        &f.to_string_lossy(),
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("id pins: repository_owner_id = \"500001\""),
        "{t}"
    );
    assert!(
        t.contains("repository_owner_id \"987654321\" is not the pinned id \"500001\""),
        "{t}"
    );
}

#[test]
fn policy_explain_shows_each_rules_issuer_its_id_pins_and_why_another_issuer_does_not_match() {
    let stack = stack(Policies::Repo);
    let explain = |token: &str, json: bool| {
        let f = stack.agent.token_file(token);
        let f = f.to_string_lossy();
        let mut args = vec!["policy", "explain", "--oidc-token-file", &f];
        if json {
            args.push("--json");
        }
        let out = stack.agent.cli(&args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let t = explain(&GithubJob::production().token(), false);
    let lines: Vec<&str> = t.lines().collect();
    assert!(
        lines[0].ends_with(&format!("(token of {GITHUB_ISSUER})")),
        "{t}"
    );
    let at = lines
        .iter()
        .position(|l| l.contains("MATCH web-production"))
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(
        lines[at + 1..at + 4],
        [
            "        trusts: https://token.actions.githubusercontent.com (github), by provider = \"github\"",
            "        id pins: repository_id = \"700001\", repository_owner_id = \"500001\"",
            "        issuer \"https://token.actions.githubusercontent.com\" is the rule's issuer",
        ],
        "{t}"
    );
    // The read-only rule also takes attested claims of its provider, and pins no id.
    let ro = lines
        .iter()
        .position(|l| l.contains("acme-ci-readonly"))
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(
        lines[ro + 1],
        "        trusts: https://token.actions.githubusercontent.com (github), by provider = \"github\"; and runner-attested github claims",
        "{t}"
    );
    assert!(!lines[ro + 2].contains("id pins"), "{t}");

    // A Buildkite token of acme: every rule says first that its issuer is not theirs.
    let t = explain(&buildkite_acme(), false);
    assert!(
        t.lines()
            .next()
            .unwrap_or("")
            .ends_with(&format!("(token of {BUILDKITE_ISSUER})")),
        "{t}"
    );
    let why = format!(
        "issuer \"{BUILDKITE_ISSUER}\" is not the rule's issuer \"{GITHUB_ISSUER}\": tokens of another \
         issuer never match, whatever their names (the rule's other keys are not compared)"
    );
    assert_eq!(t.matches(&why).count(), 3, "{t}");
    assert!(!t.contains("MATCH"), "{t}");
    assert!(
        t.contains("decision: refused: no policy rule matches buildkite acme/web"),
        "{t}"
    );

    // JSON: the scope and the pins of every rule, the issuer as the first reason.
    let ex: Value = serde_json::from_str(&explain(&gitlab_acme(), true)).expect("JSON");
    let prod = &ex["rules"][0];
    assert_eq!(prod["rule"], "web-production");
    assert_eq!(
        prod["scope"],
        json!({"issuer": GITHUB_ISSUER, "provider": "github", "written": "provider = \"github\""})
    );
    assert_eq!(
        prod["id_pins"],
        json!([
            "repository_id = \"700001\"",
            "repository_owner_id = \"500001\""
        ])
    );
    assert_eq!(prod["require_oidc"], true);
    assert_eq!(ex["rules"][2]["require_oidc"], false);
    for r in ex["rules"].as_array().expect("rules") {
        assert_eq!(r["matched"], false, "{r}");
        assert!(
            r["reasons"][0].as_str().unwrap_or("").starts_with(&format!(
                "issuer \"{GITLAB_ISSUER}\" is not the rule's issuer"
            )),
            "{r}"
        );
    }
}

/// `airlock policy` commands need the agent's issuers: without a readable configuration
/// they say so, and do not check against an empty list.
#[test]
fn policy_commands_without_the_agents_configuration_say_so() {
    let dir = paths::repo_root().join("policies");
    let out = std::process::Command::new(paths::bin("airlock"))
        .args(["--config", "/nonexistent/airlock.toml", "policy", "check"])
        .arg(&dir)
        .output()
        .expect("run airlock");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains("cannot read config /nonexistent/airlock.toml"),
        "{t}"
    );
    assert!(
        t.contains("policies are checked against the issuers the agent trusts"),
        "{t}"
    );
}
