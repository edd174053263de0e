//! The operator's CLI and the agent's surroundings, run as a user would: `policy explain` and
//! `policy check`, `audit query`, the control socket's and files' permissions, bind-once,
//! attested identities, the maximum lifetime, STS outages and `/metrics`.

use airlock_tests::agent::{free_port, Agent, AgentOptions, Job};
use airlock_tests::oidc::GithubJob;
use airlock_tests::paths;
use airlock_tests::stack::Stack;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PROD_DEPLOY_ARN: &str = "arn:aws:iam::123456789012:role/web-prod-deploy";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stdout_json(out: &Output) -> Value {
    match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(e) => panic!("not JSON ({e}): {}", text(out)),
    }
}

/// An agent whose STS is a closed loopback port: everything but credentials works.
fn agent_without_sts() -> Agent {
    let port = free_port().expect("free port");
    let opts = AgentOptions::new(
        &format!("http://127.0.0.1:{port}"),
        "AKIAIOSFODNN7EXAMPLE",
        "not-a-real-secret-key",
    );
    match Agent::start(opts) {
        Ok(a) => a,
        Err(e) => panic!("airlockd did not start with STS down: {e}"),
    }
}

/// Attested GitHub claims for `acme/web` (no token: the runner vouches for them).
fn attested_web(git_ref: &str, environment: Option<&str>) -> Value {
    let mut c = json!({
        "provider": "github",
        "repository": "acme/web",
        "repository_owner": "acme",
        "ref": git_ref,
        "ref_type": "branch",
        "event_name": "push",
        "actor": "runner-bot",
        "run_id": "9300001",
        "run_attempt": "1",
        "workflow": "ci.yml",
    });
    if let Some(env) = environment {
        c["environment"] = json!(env);
    }
    c
}

fn explain(agent: &Agent, flag: &str, file: &Path, as_json: bool) -> Output {
    let file = file.to_string_lossy();
    let mut args = vec!["policy", "explain", flag, &file];
    if as_json {
        args.push("--json");
    }
    agent.cli(&args)
}

fn rule<'a>(ex: &'a Value, name: &str) -> &'a Value {
    ex["rules"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["rule"] == name))
        .unwrap_or_else(|| panic!("rule {name} missing from the explanation: {ex}"))
}

fn reasons(rule: &Value) -> String {
    rule["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

#[test]
fn policy_explain_names_the_matching_rule_and_why_the_others_did_not_match() {
    let agent = agent_without_sts();
    let prod = agent.token_file(&GithubJob::production().token());
    let feature = agent.token_file(&GithubJob::feature_branch().token());

    // Production token, text.
    let out = explain(&agent, "--oidc-token-file", &prod, false);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(
        t.lines()
            .any(|l| l.contains("MATCH") && l.contains("web-production")),
        "{t}"
    );
    assert!(t.contains("decision: rule web-production"), "{t}");
    assert!(
        t.lines()
            .any(|l| l.contains("deploy (default)") && l.contains(PROD_DEPLOY_ARN)),
        "{t}"
    );
    assert!(!t.contains("refused"), "{t}");
    // Production token, JSON.
    let out = explain(&agent, "--oidc-token-file", &prod, true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ex = stdout_json(&out);
    assert_eq!(ex["decision"]["rule"], "web-production", "{ex}");
    assert!(ex["decision"]["refused"].is_null(), "{ex}");
    let grants = ex["decision"]["grants"].as_array().expect("grants");
    let deploy = grants
        .iter()
        .find(|g| g["alias"] == "deploy")
        .unwrap_or_else(|| panic!("no deploy grant: {ex}"));
    assert_eq!(deploy["role_arn"], PROD_DEPLOY_ARN);
    assert_eq!(deploy["default"], true);
    assert_eq!(rule(&ex, "web-production")["matched"], true);
    assert_eq!(rule(&ex, "web-staging")["matched"], false);

    // Feature-branch token of another organisation: every rule says why not.
    let out = explain(&agent, "--oidc-token-file", &feature, true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ex = stdout_json(&out);
    for name in ["web-production", "web-staging", "acme-ci-readonly"] {
        let r = rule(&ex, name);
        assert_eq!(r["matched"], false, "{name}: {r}");
        assert!(!reasons(r).is_empty(), "{name} gives no reason: {r}");
    }
    let why = reasons(rule(&ex, "web-production"));
    assert!(why.contains("ref \"refs/heads/feature/login\""), "{why}");
    assert!(why.contains("environment"), "{why}");
    assert!(
        reasons(rule(&ex, "acme-ci-readonly")).contains("owner \"other-org\""),
        "{ex}"
    );
    assert!(ex["decision"]["rule"].is_null(), "{ex}");
    assert!(
        ex["decision"]["grants"]
            .as_array()
            .is_none_or(|g| g.is_empty()),
        "{ex}"
    );
    assert!(ex["decision"]["refused"].is_string(), "{ex}");
    let out = explain(&agent, "--oidc-token-file", &feature, false);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("decision: refused"), "{t}");
    assert!(!t.contains("MATCH"), "{t}");
    assert!(
        t.contains("ref \"refs/heads/feature/login\" does not match \"refs/heads/main\""),
        "{t}"
    );

    // Attested claims for an acme/web feature branch: the read-only catch-all, which
    // accepts attested identities.
    let claims = agent.token_file(&attested_web("refs/heads/feature/x", None).to_string());
    let out = explain(&agent, "--claims-file", &claims, true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ex = stdout_json(&out);
    assert_eq!(ex["decision"]["rule"], "acme-ci-readonly", "{ex}");
    assert!(ex["decision"]["refused"].is_null(), "{ex}");
    assert_eq!(
        ex["decision"]["grants"][0]["role_arn"],
        "arn:aws:iam::123456789012:role/ci-readonly"
    );
    assert_eq!(rule(&ex, "web-production")["matched"], false);

    // Attested claims shaped like a production deploy: production decides first, and it
    // requires OIDC, so the job gets nothing (not even the read-only fallback).
    let claims = agent.token_file(&attested_web("refs/heads/main", Some("production")).to_string());
    let out = explain(&agent, "--claims-file", &claims, true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let ex = stdout_json(&out);
    let refused = ex["decision"]["refused"].as_str().unwrap_or_default();
    assert!(
        refused.contains("web-production") && refused.contains("OIDC"),
        "{ex}"
    );
    assert!(
        ex["decision"]["grants"]
            .as_array()
            .is_none_or(|g| g.is_empty()),
        "{ex}"
    );
    assert_eq!(rule(&ex, "web-production")["matched"], true);
    let out = explain(&agent, "--claims-file", &claims, false);
    let t = text(&out);
    assert!(t.contains("decision: refused"), "{t}");
    assert!(t.contains("runner-attested"), "{t}");
}

#[test]
fn policy_check_accepts_the_repo_policies_and_names_the_broken_line() {
    let agent = agent_without_sts();
    let repo = paths::repo_root().join("policies");
    let out = agent.cli(&["policy", "check", &repo.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("10-bad.toml"),
        "[[rule]]\nname = \"x\"\ncolour = \"red\"\n\n[rule.match]\nrepository = \"acme/x\"\n\n\
         [[rule.grant]]\nalias = \"a\"\nrole_arn = \"arn:aws:iam::123456789012:role/x\"\n",
    )
    .expect("write policy");
    let out = agent.cli(&["policy", "check", &dir.path().to_string_lossy()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(65), "{t}");
    assert!(t.contains("10-bad.toml:3:1"), "file:line:column: {t}");
    assert!(t.contains("colour"), "names the unknown key: {t}");
}

fn query(agent: &Agent, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "query"];
    all.extend_from_slice(args);
    let out = agent.cli(&all);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn jobs_of(recs: &[Value]) -> BTreeSet<String> {
    recs.iter()
        .filter_map(|r| r["job"].as_str().map(str::to_owned))
        .collect()
}

fn seqs(recs: &[Value]) -> Vec<u64> {
    recs.iter().filter_map(|r| r["seq"].as_u64()).collect()
}

fn served(job: &Job) {
    let (status, body) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn audit_query_filters_by_repository_role_event_job_and_time() {
    let stack = Stack::start();
    let a = &stack.agent;
    // Three phases a second apart, so --since/--until have clean boundaries.
    let prod = stack.job(&GithubJob::production());
    served(&prod);
    std::thread::sleep(Duration::from_millis(1100));
    let staging = stack.job(&GithubJob::staging());
    served(&staging);
    std::thread::sleep(Duration::from_millis(1100));
    let feature = stack.job(&GithubJob::feature_branch());
    assert!(feature.refused.is_some(), "{:?}", feature.raw);
    assert!(a.end_job(&prod.job_id).status.success());

    let all = a.audit_records();
    let started = |job: &str| {
        all.iter()
            .find(|r| r["event"] == "job_started" && r["job"] == job)
            .unwrap_or_else(|| panic!("no job_started for {job}"))
            .clone()
    };
    let job_set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();

    let recs = query(a, &["--repository", "acme/web"]);
    assert!(
        recs.iter().all(|r| r["repository"] == "acme/web"),
        "{recs:?}"
    );
    assert_eq!(
        jobs_of(&recs),
        job_set(&[&prod.job_id, &staging.job_id]),
        "{recs:?}"
    );
    let recs = query(a, &["--repository", "other-org/tool"]);
    assert_eq!(jobs_of(&recs), job_set(&[&feature.job_id]), "{recs:?}");

    let recs = query(
        a,
        &[
            "--role",
            "web-staging-deploy",
            "--event",
            "credentials_issued",
        ],
    );
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r["event"] == "credentials_issued"
        && r["role_arn"] == "arn:aws:iam::123456789012:role/web-staging-deploy"));
    assert_eq!(jobs_of(&recs), job_set(&[&staging.job_id]));
    let recs = query(a, &["--role", PROD_DEPLOY_ARN]);
    assert!(!recs.is_empty());
    assert!(
        recs.iter().all(|r| r["role_arn"] == PROD_DEPLOY_ARN),
        "{recs:?}"
    );
    assert_eq!(jobs_of(&recs), job_set(&[&prod.job_id]));

    let recs = query(a, &["--event", "job_started"]);
    assert_eq!(recs.len(), 3, "{recs:?}");
    assert_eq!(
        jobs_of(&recs),
        job_set(&[&prod.job_id, &staging.job_id, &feature.job_id])
    );

    let recs = query(a, &["--job", &prod.job_id]);
    assert!(recs.iter().all(|r| r["job"] == prod.job_id.as_str()));
    let events: BTreeSet<&str> = recs.iter().filter_map(|r| r["event"].as_str()).collect();
    for e in ["job_started", "credentials_issued", "job_ended"] {
        assert!(events.contains(e), "--job lacks {e}: {events:?}");
    }
    let expected = all.iter().filter(|r| r["job"] == prod.job_id.as_str());
    assert_eq!(recs.len(), expected.count());

    // The staging job's start is the boundary: a second after everything of the production
    // job and a second before the feature-branch job.
    let boundary = started(&staging.job_id);
    let t = boundary["time"].as_str().expect("time").to_owned();
    let b_seq = boundary["seq"].as_u64().expect("seq");
    let c_seq = started(&feature.job_id)["seq"].as_u64().expect("seq");
    let recs = query(a, &["--since", &t]);
    let want: Vec<u64> = seqs(&all).into_iter().filter(|s| *s >= b_seq).collect();
    assert_eq!(seqs(&recs), want, "--since {t}");
    let recs = query(a, &["--until", &t]);
    let got = seqs(&recs);
    assert!(
        got.iter().copied().eq(1..=got.len() as u64),
        "--until {t} is a prefix: {got:?}"
    );
    assert!(
        got.contains(&b_seq),
        "--until {t} includes {b_seq}: {got:?}"
    );
    assert!(got.iter().all(|s| *s < c_seq), "--until {t}: {got:?}");
    let recs = query(a, &["--since", &t, "--until", &t, "--event", "job_started"]);
    assert_eq!(jobs_of(&recs), job_set(&[&staging.job_id]));

    let out = a.cli(&["audit", "query", "--since", "yesterday"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(64), "{t}");
    assert!(
        t.contains("--since") && t.contains("RFC 3339"),
        "a clear error: {t}"
    );
}

/// `airlock ARGS` as the unprivileged user `nobody`.
fn cli_as_nobody(agent: &Agent, args: &[&str]) -> Output {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(paths::bin("airlock"))
        .arg("--config")
        .arg(agent.config_path())
        .args(args)
        .env_remove("AIRLOCK_SOCKET")
        .output();
    match out {
        Ok(o) => o,
        Err(e) => panic!("cannot run setpriv (util-linux): {e}"),
    }
}

fn mode(path: &Path) -> u32 {
    match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

#[test]
fn the_control_socket_and_the_agents_files_are_root_only() {
    let agent = agent_without_sts();
    // The temp tree is 0700; open it up so that only the socket's own mode stands between
    // `nobody` and the agent.
    std::fs::set_permissions(agent.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = agent.socket_path();
    let meta = std::fs::symlink_metadata(&socket).expect("socket exists");
    assert_eq!(mode(&socket), 0o600, "control socket mode");
    assert_eq!(meta.uid(), 0, "control socket owner");

    let root = agent.cli(&["job", "list", "--json"]);
    assert!(root.status.success(), "root is answered: {}", text(&root));
    let out = cli_as_nobody(&agent, &["job", "list", "--json"]);
    let t = text(&out);
    assert!(!out.status.success(), "nobody was answered: {t}");
    assert_eq!(out.status.code(), Some(69), "{t}");
    assert!(
        t.contains(&*socket.to_string_lossy()),
        "names the socket: {t}"
    );
    assert!(t.contains("Permission denied"), "{t}");
    // Nor may nobody start a job.
    let prod = agent.token_file(&GithubJob::production().token());
    std::fs::set_permissions(&prod, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = cli_as_nobody(
        &agent,
        &["job", "start", "--oidc-token-file", &prod.to_string_lossy()],
    );
    assert!(
        !out.status.success(),
        "nobody started a job: {}",
        text(&out)
    );
    assert!(!agent
        .audit_records()
        .iter()
        .any(|r| r["event"] == "job_started"));

    let job = agent
        .start_job(&GithubJob::production().token())
        .expect("root starts a job");
    let tok = std::fs::metadata(&job.token_file).expect("token file exists");
    assert_eq!(tok.permissions().mode() & 0o7777, 0o600, "token file mode");
    assert_eq!(tok.uid(), 0, "token file owner");
    assert_eq!(
        std::fs::read_to_string(&job.token_file)
            .map(|s| s.trim().to_owned())
            .ok(),
        Some(job.token.clone())
    );
    assert_eq!(
        mode(&agent.dir().join("state/jobs")),
        0o700,
        "state dir jobs/"
    );
    assert_eq!(mode(&agent.audit_path()), 0o600, "audit log");
}

#[test]
fn a_bind_later_job_binds_exactly_once() {
    let stack = Stack::start();
    let a = &stack.agent;
    let out = a.cli(&["job", "start", "--bind-later"]);
    assert!(out.status.success(), "{}", text(&out));
    let job = Job::from_json(stdout_json(&out)).expect("job fields");
    let (status, body) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["Code"], "IdentityNotBound", "{body}");

    let prod = a.token_file(&GithubJob::production().token());
    let prod = prod.to_string_lossy();
    let out = a.cli(&["job", "bind", &job.job_id, "--oidc-token-file", &prod]);
    assert!(out.status.success(), "bind: {}", text(&out));
    assert_eq!(stdout_json(&out)["rule"], "web-production");
    let (status, body) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["RoleArn"], PROD_DEPLOY_ARN, "{body}");

    // A second bind, even with a different identity, is refused and audited.
    let staging = a.token_file(&GithubJob::staging().token());
    let out = a.cli(&[
        "job",
        "bind",
        &job.job_id,
        "--oidc-token-file",
        &staging.to_string_lossy(),
    ]);
    let t = text(&out);
    assert!(!out.status.success(), "second bind accepted: {t}");
    assert!(t.contains("already bound"), "{t}");
    let (status, body) = job.credentials().expect("endpoint answers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["RoleArn"], PROD_DEPLOY_ARN, "still production: {body}");
    let recs = a.audit_records();
    assert!(
        recs.iter()
            .any(|r| r["event"] == "bind_refused" && r["job"] == job.job_id.as_str()),
        "{recs:?}"
    );
    assert_eq!(
        recs.iter()
            .filter(|r| r["event"] == "job_bound" && r["job"] == job.job_id.as_str())
            .count(),
        1
    );
}

#[test]
fn attested_claims_get_the_read_only_role_end_to_end() {
    let stack = Stack::start();
    let a = &stack.agent;
    let claims = a.token_file(&attested_web("refs/heads/feature/x", None).to_string());
    let python = paths::venv_bin("python");
    let script = paths::repo_root().join("tests/clients/get_identity.py");
    let out = a.cli_env(
        &[
            "run",
            "--claims-file",
            &claims.to_string_lossy(),
            "--",
            &python.to_string_lossy(),
            &script.to_string_lossy(),
        ],
        &[
            ("AWS_ENDPOINT_URL_STS", stack.sts()),
            ("AWS_MAX_ATTEMPTS", "1"),
        ],
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let ident: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let arn = ident["Arn"].as_str().unwrap_or_default();
    assert!(
        arn.starts_with("arn:aws:sts::123456789012:assumed-role/ci-readonly/"),
        "{t}"
    );
    assert_eq!(ident["method"], "container-role", "{t}");
    let recs = a.audit_records();
    let started = recs
        .iter()
        .find(|r| r["event"] == "job_started")
        .unwrap_or_else(|| panic!("no job_started: {recs:?}"));
    assert_eq!(started["source"], "attested", "{started}");
    assert_eq!(started["rule"], "acme-ci-readonly", "{started}");
    assert_eq!(started["repository"], "acme/web", "{started}");
}

#[test]
fn a_job_is_ended_at_its_maximum_lifetime() {
    let stack = Stack::start();
    let a = &stack.agent;
    let prod = a.token_file(&GithubJob::production().token());
    let out = a.cli(&[
        "job",
        "start",
        "--max-lifetime",
        "10s",
        "--oidc-token-file",
        &prod.to_string_lossy(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    let job = Job::from_json(stdout_json(&out)).expect("job fields");
    served(&job);
    let listed = || {
        let out = a.cli(&["job", "list", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).contains(&job.job_id)
    };
    assert!(listed(), "the job is listed while it lives");
    // The agent reaps every 5 s: the job is gone between 10 and about 15 s after its start.
    let deadline = started + Duration::from_secs(20);
    while listed() {
        assert!(Instant::now() < deadline, "job still listed after 20 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "ended early: {:?}",
        started.elapsed()
    );
    match job.get_with_token("/v1/credentials", &job.token) {
        Ok((status, body)) => {
            assert_eq!(status, 403, "{body}");
            assert!(!body.contains("SecretAccessKey"), "{body}");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
    }
    let recs = a.audit_records();
    let ended = recs
        .iter()
        .find(|r| r["event"] == "job_ended" && r["job"] == job.job_id.as_str())
        .unwrap_or_else(|| panic!("no job_ended: {recs:?}"));
    assert!(
        ended["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("maximum lifetime"),
        "{ended}"
    );
}

/// The value of the first `/metrics` sample whose name and labels start with `prefix`.
fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn with_sts_down_jobs_get_a_clear_5xx_and_the_agent_stays_healthy() {
    let agent = agent_without_sts();
    assert_eq!(agent.healthz(), Some(200));
    let job = agent
        .start_job(&GithubJob::production().token())
        .expect("a job starts while STS is down");
    assert_eq!(job.rule.as_deref(), Some("web-production"));

    let started = Instant::now();
    let body = loop {
        let (status, body) = job
            .get_with_token("/v1/credentials", &job.token)
            .expect("endpoint answers");
        assert!((500..600).contains(&status), "{status} {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(v["Code"].is_string() && v["Message"].is_string(), "{body}");
        let msg = v["Message"].as_str().unwrap_or_default().to_owned();
        if msg.contains("STS is unavailable") {
            break v;
        }
        // Only "still fetching" may come first.
        assert_eq!(v["Code"], "CredentialsPending", "{body}");
        assert!(started.elapsed() < Duration::from_secs(3), "{body}");
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(body["Code"], "ServiceUnavailable", "{body}");
    assert!(!body.to_string().contains("not-a-real-secret-key"));
    assert_eq!(agent.healthz(), Some(200));

    let refused = agent
        .start_job(&GithubJob::feature_branch().token())
        .expect("a refused job still starts");
    let (status, body) = refused.credentials().expect("endpoint answers");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["Code"], "AccessDenied", "{body}");

    let m = agent.metrics().expect("/metrics answers");
    let failed: f64 = m
        .lines()
        .filter(|l| l.starts_with("airlock_sts_calls_total{") && !l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failed >= 1.0, "no failed STS call counted:\n{m}");
    assert!(
        !m.lines().any(|l| l.starts_with("airlock_sts_calls_total{")
            && l.contains("outcome=\"ok\"")
            && !l.ends_with(" 0")),
        "an STS call succeeded?\n{m}"
    );
    assert_eq!(metric(&m, "airlock_active_jobs"), Some(2.0), "{m}");
}

#[test]
fn metrics_count_served_credentials_and_cache_hits() {
    let stack = Stack::start();
    let job = stack.job(&GithubJob::production());
    served(&job);
    served(&job);
    let m = stack.agent.metrics().expect("/metrics answers");
    let ok = metric(&m, "airlock_endpoint_requests_total{outcome=\"ok\"}");
    assert!(ok.is_some_and(|n| n >= 2.0), "{m}");
    let hits = metric(&m, "airlock_credential_cache_hits_total");
    assert!(hits.is_some_and(|n| n >= 1.0), "{m}");
    assert!(
        metric(
            &m,
            "airlock_sts_calls_total{action=\"AssumeRole\",outcome=\"ok\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    assert_eq!(metric(&m, "airlock_active_jobs"), Some(1.0), "{m}");
}
