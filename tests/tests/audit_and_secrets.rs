//! The audit promise: every decision is recorded, the chain detects any edit, deletion or
//! reordering; and the secrets promise: no secret key, session token, OIDC token or
//! endpoint token handed out ever appears in the agent's log or the audit log.

use airlock_tests::agent::Policies;
use airlock_tests::clients::{self, Client};
use airlock_tests::oidc::GithubJob;
use airlock_tests::paths;
use airlock_tests::stack::Stack;

/// A rule whose role lies in an account the agent may not assume into: STS (moto, with
/// IAM checks on) answers AccessDenied, so the run contains a real STS error.
const FOREIGN_ROLE_POLICY: &str = r#"
[[rule]]
name = "foreign-account"
[rule.match]
provider = "github"
repository = "acme/foreign"
[[rule.grant]]
alias = "deploy"
default = true
role_arn = "arn:aws:iam::999999999999:role/elsewhere"
via = "assume-role"
duration = "1h"
"#;

fn repo_policies_plus(extra: (&str, &str)) -> Policies {
    let dir = paths::repo_root().join("policies");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("policies/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (name, std::fs::read_to_string(&p).expect("policy text"))
        })
        .collect();
    files.push((extra.0.to_owned(), extra.1.to_owned()));
    Policies::Files(files)
}

#[test]
fn no_secret_ever_reaches_the_agent_log_or_the_audit_log() {
    let stack = Stack::start_with(|o| {
        o.policies(repo_policies_plus(("05-foreign.toml", FOREIGN_ROLE_POLICY)))
            .log_filter("debug")
    });
    let mut secrets: Vec<(String, String)> = vec![(
        "agent secret key".into(),
        stack.moto.agent_secret_key().to_owned(),
    )];
    let mut note = |what: &str, v: &str| {
        if v.len() >= 8 {
            secrets.push((what.to_owned(), v.to_owned()));
        }
    };

    let people = [
        GithubJob::production(),
        GithubJob::staging(),
        GithubJob::fork_pull_request(),
        GithubJob::feature_branch(),
    ];
    for who in &people {
        let token = who.token();
        note(&format!("OIDC token of {}", who.repository), &token);
        if let Some(sig) = token.rsplit('.').next() {
            note("OIDC token signature", sig);
        }
        let file = stack.agent.token_file(&token);
        let out = stack
            .agent
            .cli(&["job", "start", "--oidc-token-file", &file.to_string_lossy()]);
        let Some(job) = serde_json::from_slice(&out.stdout)
            .ok()
            .and_then(airlock_tests::agent::Job::from_json)
        else {
            continue;
        };
        note("endpoint token", &job.token);
        if job.refused.is_none() {
            let (status, body) = job.credentials().expect("endpoint answers");
            assert_eq!(status, 200, "{}: {body}", who.repository);
            note(
                "secret access key",
                body["SecretAccessKey"].as_str().unwrap_or_default(),
            );
            note("session token", body["Token"].as_str().unwrap_or_default());
            // A real SDK too, so the SDK's own paths are exercised with debug logging on.
            let run = clients::run(Client::Boto3, &job.container_env(), stack.sts());
            assert!(run.success, "{}", run.stderr);
        }
        // A wrong token and an IMDS session, both refused or served, also logged.
        let _ = job.get_with_token("/v1/credentials", "wrong-token-value-123");
        stack.agent.end_job(&job.job_id);
    }

    // The STS error.
    let mut foreign = GithubJob::production().with_run_id(9_300_001);
    foreign.repository = "acme/foreign".into();
    foreign.environment = None;
    let token = foreign.token();
    note("OIDC token of acme/foreign", &token);
    let file = stack.agent.token_file(&token);
    let out = stack
        .agent
        .cli(&["job", "start", "--oidc-token-file", &file.to_string_lossy()]);
    if let Some(job) = serde_json::from_slice(&out.stdout)
        .ok()
        .and_then(airlock_tests::agent::Job::from_json)
    {
        note("endpoint token", &job.token);
        let (status, body) = job.credentials().expect("endpoint answers");
        assert!(
            status >= 400,
            "a role in another account was served: {body}"
        );
    }
    let records = stack.agent.audit_records();
    assert!(
        records.iter().any(|r| r["event"] == "sts_error"),
        "the run should contain an sts_error record: {records:#?}"
    );
    assert!(records.iter().any(|r| r["event"] == "credentials_issued"));
    // A refusal is audited, as its own event or as a job start that carries the reason.
    assert!(records
        .iter()
        .any(|r| r["event"] == "job_refused" || r["refused"].is_string()));

    let log = stack.agent.log();
    let audit = std::fs::read_to_string(stack.agent.audit_path()).expect("audit log");
    assert!(!log.is_empty() && !audit.is_empty());
    let mut leaks = Vec::new();
    for (what, value) in &secrets {
        if log.contains(value.as_str()) {
            leaks.push(format!("{what} in the agent log"));
        }
        if audit.contains(value.as_str()) {
            leaks.push(format!("{what} in the audit log"));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:?}");
    // The check itself can fail: access key ids are not secret and are audited.
    assert!(records
        .iter()
        .any(|r| r["access_key_id"].as_str().is_some_and(|k| !k.is_empty())));
}

fn verify(stack: &Stack, file: &std::path::Path) -> (Option<i32>, String) {
    let out = stack
        .agent
        .cli(&["audit", "verify", &file.to_string_lossy()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn audit_verify_passes_on_a_run_and_names_the_line_of_any_tampering() {
    let stack = Stack::start();
    for who in [
        GithubJob::production(),
        GithubJob::staging(),
        GithubJob::feature_branch(),
    ] {
        if let Ok(job) = stack.agent.start_job(&who.token()) {
            let _ = job.credentials();
            stack.agent.end_job(&job.job_id);
        }
    }
    let out = stack.agent.cli(&["audit", "verify"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let original = std::fs::read_to_string(stack.agent.audit_path()).expect("audit log");
    let lines: Vec<&str> = original.lines().collect();
    assert!(
        lines.len() >= 4,
        "too few records to tamper with: {original}"
    );
    let (code, _) = verify(&stack, &stack.agent.audit_path());
    assert_eq!(code, Some(0));

    let mut edited: serde_json::Value = serde_json::from_str(lines[2]).expect("record JSON");
    edited["repository"] = serde_json::json!("evil/repo");
    let edit = {
        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        l[2] = edited.to_string();
        l
    };
    let delete = {
        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        l.remove(2);
        l
    };
    let swap = {
        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        l.swap(2, 3);
        l
    };
    for (name, content) in [("edit", edit), ("delete", delete), ("swap", swap)] {
        let file = stack.agent.dir().join(format!("audit-{name}.jsonl"));
        std::fs::write(&file, content.join("\n") + "\n").expect("write");
        let (code, text) = verify(&stack, &file);
        assert_eq!(code, Some(65), "{name}: {text}");
        assert!(
            text.contains("line 3") || text.contains(":3:") || text.contains(":3 "),
            "{name}: the report should name line 3: {text}"
        );
    }
}
