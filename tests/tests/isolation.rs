//! Jobs never get each other's credentials or more than their policy grants, and an ended
//! job's token stops working at once.

use airlock_tests::clients::{self, assumed_role_arn, Client};
use airlock_tests::oidc::GithubJob;
use airlock_tests::stack::Stack;

#[test]
fn concurrent_jobs_never_receive_each_others_credentials() {
    let stack = Stack::start();
    let (prod, staging) = std::thread::scope(|s| {
        let a = s.spawn(|| stack.job(&GithubJob::production()));
        let b = s.spawn(|| stack.job(&GithubJob::staging()));
        (
            a.join().expect("prod start"),
            b.join().expect("staging start"),
        )
    });
    assert_ne!(
        prod.endpoint, staging.endpoint,
        "each job has its own listener"
    );
    assert_ne!(prod.token, staging.token);
    // Both jobs' SDKs at the same time.
    let (rp, rs) = std::thread::scope(|s| {
        let a = s.spawn(|| clients::run(Client::Boto3, &prod.container_env(), stack.sts()));
        let b = s.spawn(|| clients::run(Client::Boto3, &staging.container_env(), stack.sts()));
        (
            a.join().expect("boto3 prod"),
            b.join().expect("boto3 staging"),
        )
    });
    assert!(
        rp.success && rs.success,
        "prod: {}\nstaging: {}",
        rp.stderr,
        rs.stderr
    );
    let sp = stack
        .agent
        .session_name(&prod.job_id)
        .expect("prod session audited");
    let ss = stack
        .agent
        .session_name(&staging.job_id)
        .expect("staging session audited");
    assert_ne!(sp, ss, "session names must name the job");
    assert_eq!(rp.arn(), Some(assumed_role_arn("web-prod-deploy", &sp)));
    assert_eq!(rs.arn(), Some(assumed_role_arn("web-staging-deploy", &ss)));
    assert_ne!(rp.json()["AccessKeyId"], rs.json()["AccessKeyId"]);

    // One job's token on the other job's listener is refused, both ways round.
    for (listener, token) in [(&prod, &staging.token), (&staging, &prod.token)] {
        let (status, body) = listener
            .get_with_token("/v1/credentials", token)
            .expect("endpoint answers");
        assert_eq!(
            status, 403,
            "foreign token on {}: {body}",
            listener.endpoint
        );
        assert!(!body.contains("SecretAccessKey"), "{body}");
    }
}

#[test]
fn a_staging_identity_never_gets_the_production_role() {
    let stack = Stack::start();
    let staging = stack.job(&GithubJob::staging());
    assert_eq!(staging.rule.as_deref(), Some("web-staging"));
    assert_eq!(
        staging.grants,
        vec!["deploy".to_string()],
        "{:?}",
        staging.raw
    );
    let (status, body) = staging.credentials().expect("endpoint answers");
    assert_eq!(status, 200);
    assert_eq!(
        body["RoleArn"].as_str().unwrap_or_default(),
        "arn:aws:iam::123456789012:role/web-staging-deploy",
        "{body}"
    );
    // Asking by the production rule's other alias does not work either.
    let (status, _) = staging
        .get_with_token("/v1/credentials/readonly", &staging.token)
        .expect("endpoint answers");
    assert!(
        (400..500).contains(&status),
        "alias of another rule: {status}"
    );

    // A job that claims the production environment from a feature branch is not production.
    let mut sneaky = GithubJob::production().with_run_id(9_200_001);
    sneaky.git_ref = "refs/heads/feature/x".into();
    let job = stack.job(&sneaky);
    assert_ne!(job.rule.as_deref(), Some("web-production"), "{:?}", job.raw);
    if job.refused.is_none() {
        let (_, body) = job.credentials().expect("endpoint answers");
        assert_ne!(
            body["RoleArn"].as_str().unwrap_or_default(),
            "arn:aws:iam::123456789012:role/web-prod-deploy"
        );
    }
    // And a pull request from a fork never reaches production.
    let pr = stack.job(&GithubJob::fork_pull_request());
    assert_ne!(pr.rule.as_deref(), Some("web-production"), "{:?}", pr.raw);
    assert!(!pr.grants.iter().any(|g| g == "deploy"), "{:?}", pr.raw);
}

#[test]
fn an_ended_jobs_token_is_refused_at_once() {
    let stack = Stack::start();
    let job = stack.job(&GithubJob::production());
    assert_eq!(job.credentials().expect("endpoint answers").0, 200);
    let out = stack.agent.end_job(&job.job_id);
    assert!(
        out.status.success(),
        "job end: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No sleep: "at once". The listener may be closed (connection refused) or answer 403;
    // it must never serve credentials again.
    match job.get_with_token("/v1/credentials", &job.token) {
        Ok((status, body)) => assert_eq!(status, 403, "after job end: {body}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
    }
    let list = stack.agent.cli(&["job", "list", "--json"]);
    assert!(list.status.success());
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&job.job_id));
}

#[test]
fn a_job_matching_no_rule_gets_a_clear_refusal_through_the_sdk() {
    let stack = Stack::start();
    let file = stack.agent.token_file(&GithubJob::feature_branch().token());
    let out = stack
        .agent
        .cli(&["job", "start", "--oidc-token-file", &file.to_string_lossy()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let Some(job) = serde_json::from_str(&stdout)
        .ok()
        .and_then(airlock_tests::agent::Job::from_json)
    else {
        // A CLI that refuses outright must say why.
        assert!(!out.status.success(), "no job and no failure: {stdout}");
        assert!(
            stderr.to_lowercase().contains("rule") || stderr.to_lowercase().contains("polic"),
            "{stderr}"
        );
        return;
    };
    let reason = job
        .refused
        .clone()
        .expect("a job matching no rule is refused");
    assert!(!reason.is_empty());
    assert!(job.grants.is_empty(), "{:?}", job.raw);
    let (status, body) = job
        .get_with_token("/v1/credentials", &job.token)
        .expect("endpoint answers");
    assert!(
        (400..500).contains(&status),
        "refused job's endpoint: {status} {body}"
    );
    let err: serde_json::Value = serde_json::from_str(&body).expect("{Code, Message} JSON");
    let message = err["Message"].as_str().expect("Message").to_owned();
    assert!(err["Code"].is_string(), "{body}");

    let run = clients::run(Client::Boto3, &job.container_env(), stack.sts());
    assert!(
        !run.success,
        "boto3 got credentials for a refused job: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains(&message),
        "the SDK's error should carry the agent's message {message:?}: {}",
        run.stderr
    );
    let run = clients::run(Client::Node("http"), &job.container_env(), stack.sts());
    assert!(
        !run.success,
        "node got credentials for a refused job: {}",
        run.stdout
    );
}
